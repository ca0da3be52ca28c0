"""selfclust: distributed self-labelling (SeLa) on Ray, WebDataset shards and PyTorch."""

__version__ = "0.1.0"
