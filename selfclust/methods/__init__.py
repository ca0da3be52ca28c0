"""The seed deep-clustering objectives beside SeLa: DEC, DEPICT and DGG.

Each method is a set of pure functions (targets, losses, global statistics with an optional
process group, as
:mod:`selfclust.labels.sinkhorn` takes one) and ``nn.Module``\\ s whose ``forward``
returns a small typed result. How they plug into the trainer: docs/methods.md.
"""
