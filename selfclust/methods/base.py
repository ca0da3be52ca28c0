"""What the training loop asks of an objective: one :class:`Method` per ``method.name``.

The loop (:mod:`selfclust.train.loop`) owns data, optimisers, checkpoints, the label bank and
the relabel schedule, and never branches on the method. A method supplies:

* its network's forward and loss on a batch (:meth:`Method.batch_losses`), in each phase:
  ``pretrain`` (DEC/DEPICT/DGG reconstruction epochs, ``pretrain_epochs`` of them) then
  ``cluster``;
* how a label pass embeds the data (:meth:`Method.embed`), the first labels
  (:meth:`Method.first_labels`, or :meth:`Method.first_bank` when no pass is needed) and
  the scheduled label updates (:meth:`Method.update_labels`);
* the state it keeps between label passes (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

from typing import Any

import torch

from selfclust.data.streams import Batches
from selfclust.labels.bank import LabelBank
from selfclust.labels.label_pass import Embedded

LabelUpdate = tuple[torch.Tensor, dict[str, Any]]  # this rank's labels [T, n_r], a record


class Method:
    """Base class: the defaults are those of a method with no extra state."""

    name: str = ""
    # Named loss terms logged beside the per-head losses (``loss_<term>``).
    terms: tuple[str, ...] = ()
    # The training phases in order; a run starts in the first. ("pretrain", "cluster"): the
    # first labels come at the start of the clustering phase, after pretrain_epochs epochs.
    phases: tuple[str, ...] = ("cluster",)
    pretrain_epochs: int = 0
    # Gradients averaged by DistributedDataParallel (True) or by one flat all-reduce after
    # backward (False: the phase's unused parameters then have no gradient on any rank).
    uses_ddp: bool = False
    # The loader draws the device augmentation's parameters of each batch (``aug``).
    device_augment: bool = False
    # uses_ddp methods: the module their forward calls, set by the loop (the DDP wrapper, and
    # torch.compile's, around the model).
    forward: Any = None

    def batch_losses(
        self,
        images: torch.Tensor,
        idx: torch.Tensor,
        aug: torch.Tensor | None = None,
        *,
        phase: str,
        epoch: int,
        step: int,
        bank: LabelBank,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to backpropagate for one batch (uint8 ``images`` of global indices
        ``idx``) and the detached vector logged for it: ``[T]`` per-head losses then one
        entry per :attr:`terms`. ``aug``: the batch's device-augmentation parameters, drawn
        by the loader when :attr:`device_augment`."""
        raise NotImplementedError

    def embed(self, batches: Batches, num_samples: int, initial: bool) -> Embedded:
        """A label pass over ``batches``: the features the labels are computed from."""
        raise NotImplementedError

    def first_bank(self) -> torch.Tensor | None:
        """The first labels ``[T, N]`` when they need no label pass (None: they do)."""
        return None

    def first_labels(self, emb: Embedded, bank: LabelBank) -> LabelUpdate:
        """The first labels from a label pass, at the start of the clustering phase."""
        raise NotImplementedError

    def update_labels(
        self, emb: Embedded, bank: LabelBank, step: int, manifold: bool
    ) -> LabelUpdate:
        """A scheduled label update at global ``step``; ``manifold``: it is one of the last
        ``method.manifold_relabels`` (UMAP + a Gaussian mixture instead of the usual rule)."""
        raise NotImplementedError

    def after_change(self, change: float, initial: bool) -> dict[str, Any]:
        """Told the fraction of bank labels an update changed (the same on every rank)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """What the method adds to the run's summary."""
        return {}

    @property
    def refits_heads(self) -> bool:
        """Whether :meth:`refit_heads` wants a label pass once training has ended."""
        return False

    def refit_heads(self, emb: Embedded) -> dict[str, Any]:
        """After the last step, before the final scoring: set the heads from a label pass
        (collective); what it did, for the summary."""
        return {}

    @property
    def stopped(self) -> bool:
        """The method's own stop rule fired (DEC's tolerance): training ends where it is."""
        return False

    @property
    def needs_resume_pass(self) -> bool:
        """Per-rank state that checkpoints do not hold must be rebuilt by a label pass."""
        return False

    def rebuild(self, batches: Batches, num_samples: int) -> None:
        """Rebuild that per-rank state after a restore (see :attr:`needs_resume_pass`)."""

    def state_dict(self) -> Any:
        """What the method keeps between label passes (None: nothing)."""
        return None

    def load_state_dict(self, state: Any) -> None:
        pass
