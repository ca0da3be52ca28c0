"""The ``method`` section: one pydantic model per method, chosen by ``method.name``.

A key is defined on the model of every method that reads it, so a key of another method is
caught before validation (:mod:`selfclust.config.run` names the method it belongs to) and a
method's runner sees only its own keys, typed. Keys every method reads live on
:class:`MethodBase`; DEC, DEPICT and DGG share :class:`PretrainedMethod` (an autoencoder
pretrained, then clustered).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from selfclust.config.method_base import _NAME, METHODS, MethodBase


class SelaMethod(MethodBase):
    name: Literal["sela"] = Field("sela", description=_NAME)
    heads: int = Field(
        10,
        ge=1,
        description="clustering heads T on one backbone, each with its own labels (SeLa "
        "ImageNet: 10); dec/depict/dgg have one",
    )
    lam: float = Field(
        25.0,
        gt=0,
        le=100,
        description="Sinkhorn λ: inverse entropic regularisation of the equal-size label "
        "assignment (SeLa: 25)",
    )
    sinkhorn_logits: Literal["auto", "stored", "recomputed"] = Field(
        "auto",
        description="stored: each head's [n, K] logits are held during its Sinkhorn solve; "
        "recomputed: rebuilt from the features in row chunks whenever the solver reads them "
        "(one block less at peak, one n x D x K product per rebuild; the same labels up to "
        "float rounding); auto: stored on the CPU, and on a GPU while two n x K float32 "
        "blocks take at most half its free memory, else recomputed",
    )
    init: Literal["kmeans", "kmeans_pixels", "manifold_pixels", "random"] = Field(
        "random",
        description="the first labels: random equal-size labels (SeLa's), k-means on the "
        "untrained backbone's pooled features (kmeans) or on raw-pixel thumbnails "
        "(kmeans_pixels), or UMAP + a Gaussian mixture on the thumbnails (manifold_pixels)",
    )
    relabel_heads: Literal["keep", "kmeans"] = Field(
        "keep",
        description="keep: each label update runs Sinkhorn on the heads as trained (SeLa); "
        "kmeans: the heads are first set to k-means centroids of the backbone's L2-normalised "
        "features (faiss over method.kmeans_samples, every rank assigning its own rows), so "
        "Sinkhorn re-partitions the feature space rather than refining the heads' own partition",
    )
    final_refine: bool = Field(
        False,
        description="after the last step, re-set each head to the spherical k-means centres of "
        "the backbone's features, refined by distributed Lloyd iterations from the head's own "
        "predictions (one label pass), before the final scoring and the export",
    )
    manifold_relabels: int = Field(
        0,
        ge=0,
        description="the last N label updates by UMAP + a Gaussian mixture of the pooled "
        "features on rank 0 (unequal, curved clusters) instead of Sinkhorn; 0: none",
    )

    def first_by_manifold(self) -> bool:
        return self.init == "manifold_pixels"

    def _first_labels(self) -> str:
        return f"method.init={self.init}"


class PretrainedMethod(MethodBase):
    """DEC, DEPICT and DGG: an autoencoder pretrained on reconstruction, then clustered."""

    cluster_init: Literal["kmeans", "manifold"] = Field(
        "kmeans",
        description="first partition of the pretrained embedding: k-means (best of "
        "method.kmeans_restarts) as the papers do, or UMAP + a Gaussian mixture, which finds "
        "curved clusters that k-means cuts",
    )
    kmeans_restarts: int = Field(
        20,
        ge=1,
        description="cluster_init=kmeans: k-means runs on the pretrained embedding; the lowest "
        "objective is kept",
    )
    pretrain_epochs: int = Field(
        50,
        ge=0,
        description="reconstruction-only epochs (Adam at method.pretrain_lr) before clustering; "
        "optim.epochs counts the clustering epochs after them",
    )
    pretrain_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the pretraining")
    embed_dim: int = Field(
        10,
        ge=1,
        description="embedding dimensions: the autoencoder's code (DGG: μ̃), which is clustered",
    )

    @property
    def heads(self) -> int:
        """One clustering layer."""
        return 1

    def first_by_manifold(self) -> bool:
        return self.cluster_init == "manifold"

    def _first_labels(self) -> str:
        return f"method.cluster_init={self.cluster_init}"


_HIDDEN = "widths of the MLP encoder's hidden layers, mirrored by the decoder"
_HEAD_FIT = "full-batch Adam steps that fit the {} to the first partition"
_PIXELS = (
    "network input: pixels in [0, 1] (unit), in [-1, 1] (signed; DEPICT's decoder then ends in "
    "tanh), or standardised as SeLa's"
)


class DecMethod(PretrainedMethod):
    name: Literal["dec"] = Field("dec", description=_NAME)
    pixels: Literal["unit", "signed", "standardized"] = Field("unit", description=_PIXELS)
    hidden: list[int] = Field(
        default_factory=lambda: [500, 500, 2000], min_length=1, description=_HIDDEN
    )
    pretrain_dropout: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="pretraining corruption: input dropout (DEC's denoising autoencoder)",
    )
    stop_tol: float = Field(
        0.001,
        ge=0,
        le=1,
        description="stop when a refresh changes fewer than this fraction of the labels (DEC's "
        "stopping rule); 0: never",
    )


class DepictMethod(PretrainedMethod):
    name: Literal["depict"] = Field("depict", description=_NAME)
    pixels: Literal["unit", "signed", "standardized"] = Field("unit", description=_PIXELS)
    conv_channels: list[int] = Field(
        default_factory=lambda: [50, 50],
        min_length=1,
        description="channels of DEPICT's stride-2 conv layers (decoder mirrored)",
    )
    conv_kernels: list[int] = Field(
        default_factory=lambda: [4, 5],
        min_length=1,
        description="kernel sizes of DEPICT's conv layers, one per method.conv_channels entry",
    )
    pretrain_dropout: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="pretraining corruption: dropout on DEPICT's noisy path",
    )
    noise_dropout: float = Field(
        0.1, ge=0, lt=1, description="dropout on DEPICT's noisy path in the clustering phase"
    )
    # The embedding learns to ignore the transformation; set the augment section for the data
    # (digits want no flips and no colour jitter).
    noise_augment: bool = Field(
        False,
        description="clustering phase: the noisy path reads a random crop / rotation of each "
        "image (the augment section); the clean path, its targets and the reconstruction "
        "targets keep the plain image",
    )
    head_fit_steps: int = Field(500, ge=0, description=_HEAD_FIT.format("softmax head"))
    manifold_relabels: int = Field(
        0,
        ge=0,
        description="the last N target refreshes give one-hot targets from UMAP + a Gaussian "
        "mixture of the embedding instead of balanced soft ones; 0: none",
    )

    @model_validator(mode="after")
    def _conv_layers(self) -> DepictMethod:
        if len(self.conv_channels) != len(self.conv_kernels):
            raise ValueError("method.conv_channels and method.conv_kernels differ in length")
        return self


class DggMethod(PretrainedMethod):
    name: Literal["dgg"] = Field("dgg", description=_NAME)
    hidden: list[int] = Field(
        default_factory=lambda: [500, 500, 2000], min_length=1, description=_HIDDEN
    )
    head_fit_steps: int = Field(500, ge=0, description=_HEAD_FIT.format("classifier"))
    knn_k: int = Field(
        10,
        ge=1,
        description="neighbours per sample in DGG's k-NN graph of the pretrained embedding",
    )
    graph_weight: float = Field(
        1.0,
        ge=0,
        description="weight of DGG's graph term Σ w_ij JS(γ_i‖γ_j) against the ELBO",
    )

    @property
    def pixels(self) -> Literal["unit"]:
        """DGG's Bernoulli decoder needs pixels in [0, 1]."""
        return "unit"


MethodConfig = Annotated[
    SelaMethod | DecMethod | DepictMethod | DggMethod, Field(discriminator="name")
]
"""``method``: the model of ``method.name``."""

PretrainedConfig = DecMethod | DepictMethod | DggMethod

BY_NAME: dict[str, type[MethodBase]] = {
    "sela": SelaMethod,
    "dec": DecMethod,
    "depict": DepictMethod,
    "dgg": DggMethod,
}


def method_keys(name: str) -> tuple[str, ...]:
    """The ``method.*`` keys that method ``name`` reads, in schema order (as YAML spells them)."""
    return tuple(BY_NAME[name].model_fields)


def key_owners(key: str) -> tuple[str, ...]:
    """The methods that read ``method.<key>``."""
    return tuple(m for m in METHODS if key in method_keys(m))
