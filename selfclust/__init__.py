"""selfclust: distributed self-labelling (SeLa) on Ray, WebDataset shards and PyTorch."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``selfclust.load_backbone`` / ``selfclust.load_model`` (:mod:`selfclust.exported`),
    imported on first use so that ``selfclust --help`` stays fast."""
    if name in ("load_backbone", "load_model"):
        from selfclust import exported

        return getattr(exported, name)
    raise AttributeError(f"module 'selfclust' has no attribute {name!r}")
