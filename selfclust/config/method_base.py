"""What every method's ``method`` section holds: :class:`MethodBase` (the keys all methods
read, and the UMAP + GMM limits they share)."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

METHODS: tuple[str, ...] = ("sela", "dec", "depict", "dgg")
"""The values of ``method.name``."""

_NAME = (
    "the method: sela (Sinkhorn pseudo-labels on a ResNet, model.*), or dec / depict / dgg (the "
    "papers' own networks: pretraining, then clustering; docs/methods.md)"
)

# UMAP + a Gaussian mixture runs on rank 0 over a sample: it is for small K.
MANIFOLD_MAX_CLUSTERS = 1000


class MethodBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(description=_NAME)
    clusters: int = Field(
        3000,
        ge=2,
        description="clusters K per head (SeLa ImageNet: 3000); the number of classes for "
        "accuracy against them",
    )
    relabels: int = Field(
        80,
        ge=1,
        description="label updates over training (SeLa: 80); dec/depict/dgg: target refreshes "
        "over the clustering phase",
    )
    relabel_power: float = Field(
        2.0,
        gt=0,
        description="spacing of the updates: update j at (j / relabels)^power of training; "
        "2 = SeLa's quadratic (frequent early), 1 = even",
    )
    relabel_start: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of training (dec/depict/dgg: of the clustering phase) before the "
        "first update, to let the network fit its first labels",
    )
    kmeans_samples: int = Field(
        100_000,
        ge=1,
        description="samples (over all ranks) that k-means and UMAP + GMM cluster; the other "
        "rows get their nearest centroid or a k-NN vote",
    )
    manifold_neighbors: int = Field(
        20, ge=2, description="UMAP n_neighbors of every UMAP + GMM clustering"
    )
    # Only for the first labels: on features trained on labels, the silhouette favours those
    # labels (docs/methods.md).
    manifold_init_candidates: int = Field(
        1,
        ge=1,
        description="first labels by UMAP + GMM (sela: init=manifold_pixels; dec/depict/dgg: "
        "cluster_init=manifold): partition N UMAP embeddings (seeds) and keep the one with the "
        "highest cosine silhouette; N times the cost (~12 s per 10k points each)",
    )

    def first_by_manifold(self) -> bool:
        """Whether the first labels come from UMAP + GMM."""
        return False

    def uses_manifold(self) -> bool:
        """Whether any labels come from UMAP + GMM (rank 0, small K only)."""
        return self.first_by_manifold() or self.manifold_updates() > 0

    def manifold_updates(self) -> int:
        """The last label updates by UMAP + GMM (sela, depict: ``method.manifold_relabels``)."""
        return int(getattr(self, "manifold_relabels", 0))

    @model_validator(mode="after")
    def _manifold_limits(self) -> MethodBase:
        if self.uses_manifold() and self.clusters > MANIFOLD_MAX_CLUSTERS:
            raise ValueError(
                f"manifold clustering (UMAP + a Gaussian mixture on rank 0) is for up to "
                f"{MANIFOLD_MAX_CLUSTERS} clusters, got method.clusters={self.clusters}: use "
                "Sinkhorn label updates (method.manifold_relabels=0) and init=kmeans or random "
                "(sela), or cluster_init=kmeans (dec/depict/dgg)"
            )
        if self.manifold_init_candidates > 1 and not self.first_by_manifold():
            first = (
                "method.init=manifold_pixels"
                if self.name == "sela"
                else "method.cluster_init=manifold"
            )
            raise ValueError(
                f"method.manifold_init_candidates={self.manifold_init_candidates} chooses among "
                f"first partitions by UMAP + GMM, but {self._first_labels()}: set {first}, or "
                "drop manifold_init_candidates"
            )
        manifold_relabels = self.manifold_updates()
        if manifold_relabels > self.relabels:
            raise ValueError(
                f"method.manifold_relabels={manifold_relabels} exceeds method.relabels="
                f"{self.relabels}: it counts the last label updates"
            )
        return self

    def _first_labels(self) -> str:
        return ""


M = TypeVar("M", bound=MethodBase)


def expect(method: MethodBase, cls: type[M]) -> M:
    """``method`` as ``cls`` (the section of the method a runner or network is built for)."""
    if not isinstance(method, cls):
        raise TypeError(f"method.name={method.name}: expected the {cls.__name__} section")
    return method
