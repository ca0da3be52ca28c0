"""The label bank: one pseudo-label per (head, global sample index)."""

from __future__ import annotations

import torch


def label_dtype(clusters: int) -> torch.dtype:
    """The smallest integer type that holds cluster ids ``0..clusters-1``: int16 up to 32,767
    clusters (SeLa's 10 × 3000 on 100M images: 2 GB per rank instead of int64's 8), else int32."""
    return torch.int16 if clusters <= torch.iinfo(torch.int16).max else torch.int32


class LabelBank:
    """Pseudo-labels ``[T, N]`` keyed by the global sample index ``idx``, never by position.

    Every rank holds the whole bank (N × T small integers, :func:`label_dtype`; looked-up rows
    become int64, as cross-entropy wants them), so a rank can look up the labels of whatever
    samples its shard stream gives it and the worker count may change on resume.
    """

    def __init__(self, heads: int, num_samples: int, clusters: int) -> None:
        if num_samples < 1 or heads < 1:
            raise ValueError(f"bank needs heads >= 1 and samples >= 1, got {heads}, {num_samples}")
        self.clusters = clusters
        self.dtype = label_dtype(clusters)
        self.labels = torch.zeros(heads, num_samples, dtype=self.dtype)

    @property
    def heads(self) -> int:
        return self.labels.shape[0]

    @property
    def num_samples(self) -> int:
        return self.labels.shape[1]

    def lookup(self, idx: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """idx [B] (on the host, as the loader gives it) → labels [T, B] on ``device``
        (default: idx's). For a CUDA device the rows are gathered into pinned memory, so the
        copy is truly asynchronous and the step does not wait for the GPU."""
        device = device or idx.device
        rows = self.labels.index_select(1, idx)
        if device.type == "cuda":
            rows = rows.pin_memory()  # from the caching host allocator: safe while in flight
        return rows.to(device, non_blocking=True).long()

    def assign(self, new: torch.Tensor) -> float:
        """Replace all labels with ``new`` [T, N]; return the fraction that changed."""
        if new.shape != self.labels.shape:
            raise ValueError(f"bank shape {tuple(self.labels.shape)}, got {tuple(new.shape)}")
        if new.min() < 0 or new.max() >= self.clusters:
            raise ValueError(f"labels must lie in 0..{self.clusters - 1}")
        new = new.cpu()
        changed = (new != self.labels).float().mean().item()
        self.labels = new.to(self.dtype, copy=True)
        return changed

    def cluster_sizes(self) -> torch.Tensor:
        """[T, K] number of samples per cluster per head."""
        return torch.stack([torch.bincount(row, minlength=self.clusters) for row in self.labels])

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {"labels": self.labels.clone(), "clusters": self.clusters}

    def load_state_dict(self, state: dict) -> None:
        """Restore the labels; other keys are ignored (older checkpoints also hold a
        ``"version"`` count that nothing reads)."""
        labels = state["labels"]
        if labels.shape != self.labels.shape or int(state["clusters"]) != self.clusters:
            raise ValueError(
                f"checkpoint bank is {tuple(labels.shape)} with K={state['clusters']}, this run "
                f"needs {tuple(self.labels.shape)} with K={self.clusters}: the dataset or "
                "method.heads/method.clusters differ from the checkpoint's"
            )
        self.labels = labels.to(self.dtype, copy=True)  # int64 in older checkpoints
