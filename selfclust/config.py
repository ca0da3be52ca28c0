"""Typed, validated run configuration.

One pydantic model per component, composed into :class:`RunConfig`. YAML files only override
the defaults; ``key=value`` command-line overrides are applied on top (``optim.lr=0.1``).
Unknown keys and bad values raise :class:`ConfigError` naming the key and what is allowed.
The resolved config is stored in every checkpoint and sent to W&B.

Every key has a ``description``; a key that only some methods read says which in
``json_schema_extra={"methods": [...]}`` (none: every method). ``selfclust config`` and
docs/config.md are generated from this schema (:mod:`selfclust.config_doc`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo

METHODS: tuple[str, ...] = ("sela", "dec", "depict", "dgg")
"""The values of ``method.name``."""

# Validation context of configs a person wrote (build_config / load_config): only these are
# checked for keys of another method. A resolved config (checkpoint, RUN_DIR/config.yaml)
# holds every key, and an old one may hold a key that was then silently ignored.
_USER_KEYS = "user_keys"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


def _for(*methods: str) -> JsonDict:
    """``json_schema_extra`` of a key that only ``methods`` read."""
    return {"methods": list(methods)}


def key_methods(field: FieldInfo) -> tuple[str, ...]:
    """The methods that read a key (from its ``json_schema_extra``; default: all)."""
    extra = field.json_schema_extra
    names = extra.get("methods") if isinstance(extra, dict) else None
    return tuple(str(m) for m in names) if isinstance(names, list) else METHODS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    train: str = Field(
        "mnist_test",
        description="training shards: a directory written by `selfclust shard`, an http(s) URL, "
        "a `pipe:` command or a brace pattern; or a built-in name (mnist_test), sharded into "
        "RUN_DIR/shards on first use",
    )
    eval: str | None = Field(
        None,
        description="shards to evaluate on (same forms as data.train); null: the training shards",
    )
    image_size: int | None = Field(
        None,
        gt=0,
        description="square side in pixels that images are resized to (augment.where=loader: "
        "the crops' size, required there); null: the shards' own size, which all images must "
        "then share",
    )
    loader_workers: int = Field(
        0,
        ge=-1,
        description="DataLoader processes per rank that read and decode shards; 0: in the "
        "training process; -1: trainer.cpus_per_worker - 1. Raise it when the GPU waits on data",
    )
    shuffle_buffer: int = Field(
        2000,
        ge=0,
        description="samples in each shard reader's shuffle buffer; larger mixes shards better "
        "and holds more images in memory; 0 or 1: shard order",
    )
    io_timeout_s: float = Field(
        30.0,
        gt=0,
        description="seconds a shard read may stall (or a missing URL be retried) before it fails",
    )


class ModelConfig(_Section):
    arch: Literal["resnet18", "resnet50", "small_resnet"] = Field(
        "resnet18",
        description="SeLa's backbone: torchvision's ResNet-18 or ResNet-50, or small_resnet, a "
        "narrow ResNet for CPUs and small images",
        json_schema_extra=_for("sela"),
    )
    widths: list[int] = Field(
        default_factory=lambda: [32, 64, 128],
        min_length=1,
        description="small_resnet: channels of each stage (torchvision BasicBlocks; every stage "
        "after the first halves the resolution)",
        json_schema_extra=_for("sela"),
    )
    blocks: int = Field(
        1,
        ge=1,
        description="small_resnet: BasicBlocks per stage",
        json_schema_extra=_for("sela"),
    )
    small_stem: bool = Field(
        True,
        description="resnet18/resnet50: a 3x3 stride-1 stem without max-pool, for 16-32 px images "
        "(CIFAR-style); false: ImageNet's 7x7 stride-2 conv and max-pool",
        json_schema_extra=_for("sela"),
    )


# Not yet checked by _keys_of_other_methods: tests/methods/test_runner.py's SHORT recipe sets
# both for dec and dgg alike (pretrain_dropout is not DGG's, head_fit_steps not DEC's).
_UNCHECKED_KEYS = frozenset({"pretrain_dropout", "head_fit_steps"})


class MethodConfig(_Section):
    name: Literal["sela", "dec", "depict", "dgg"] = Field(
        "sela",
        description="the method: sela (Sinkhorn pseudo-labels on a ResNet, model.*), or dec / "
        "depict / dgg (the papers' own networks: pretraining, then clustering; docs/methods.md)",
        json_schema_extra=_for(*METHODS),
    )
    heads: int = Field(
        10,
        ge=1,
        description="clustering heads T on one backbone, each with its own labels (SeLa "
        "ImageNet: 10); dec/depict/dgg: must be 1",
        json_schema_extra=_for(*METHODS),
    )
    clusters: int = Field(
        3000,
        ge=2,
        description="clusters K per head (SeLa ImageNet: 3000); the number of classes for "
        "accuracy against them",
        json_schema_extra=_for(*METHODS),
    )
    lam: float = Field(
        25.0,
        gt=0,
        le=100,
        description="Sinkhorn λ: inverse entropic regularisation of the equal-size label "
        "assignment (SeLa: 25)",
        json_schema_extra=_for("sela"),
    )
    sinkhorn_tol: float = Field(
        1e-3,
        gt=0,
        description="Sinkhorn stops once every cluster's share is within this relative error "
        "of 1/K; keep it >= 1e-5 (float32 iterations stall near 1e-6)",
        json_schema_extra=_for("sela"),
    )
    sinkhorn_max_iters: int = Field(
        1000,
        ge=1,
        description="most Sinkhorn iterations per head and label update",
        json_schema_extra=_for("sela"),
    )
    sinkhorn_logits: Literal["stored", "recomputed"] = Field(
        "stored",
        description="stored: each head's [n, K] logits are held during its Sinkhorn solve; "
        "recomputed: rebuilt from the features in row chunks whenever the solver reads them "
        "(one block less at peak, one n x D x K product per rebuild; the same labels up to "
        "float rounding). Use recomputed when a label pass runs out of GPU memory",
        json_schema_extra=_for("sela"),
    )
    relabels: int = Field(
        80,
        ge=1,
        description="label updates over training (SeLa: 80); dec/depict/dgg: target refreshes "
        "over the clustering phase",
        json_schema_extra=_for(*METHODS),
    )
    relabel_power: float = Field(
        2.0,
        gt=0,
        description="spacing of the updates: update j at (j / relabels)^power of training; "
        "2 = SeLa's quadratic (frequent early), 1 = even",
        json_schema_extra=_for(*METHODS),
    )
    relabel_start: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of training (dec/depict/dgg: of the clustering phase) before the "
        "first update, to let the network fit its first labels",
        json_schema_extra=_for(*METHODS),
    )
    init: Literal["kmeans", "kmeans_pixels", "manifold_pixels", "random"] = Field(
        "random",
        description="SeLa's first labels: random equal-size labels (SeLa's), k-means on the "
        "untrained backbone's pooled features (kmeans) or on raw-pixel thumbnails "
        "(kmeans_pixels), or UMAP + a Gaussian mixture on the thumbnails (manifold_pixels)",
        json_schema_extra=_for("sela"),
    )
    kmeans_pixel_size: int = Field(
        16,
        ge=1,
        description="init=kmeans_pixels / manifold_pixels: side in pixels of the thumbnails "
        "that are clustered (every channel kept)",
        json_schema_extra=_for("sela"),
    )
    kmeans_samples: int = Field(
        100_000,
        ge=1,
        description="samples (over all ranks) that k-means and UMAP + GMM cluster; the other "
        "rows get their nearest centroid or a k-NN vote",
        json_schema_extra=_for(*METHODS),
    )
    kmeans_iters: int = Field(
        25,
        ge=1,
        description="Lloyd iterations of each k-means (init=kmeans / kmeans_pixels, "
        "cluster_init=kmeans)",
        json_schema_extra=_for(*METHODS),
    )
    kmeans_seeding: Literal["random", "kmeans++", "afkmc2"] = Field(
        "random",
        description="starting centroids of every k-means: random points, k-means++, or AFK-MC² "
        "(k-means++ approximated by Markov chains; faiss)",
        json_schema_extra=_for(*METHODS),
    )
    # At small K the objective can plateau for an iteration and then fall again.
    kmeans_tol: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="stop Lloyd after an iteration that lowers the objective by less than this "
        "fraction of it (faiss's early_stop_threshold); 0: always method.kmeans_iters",
        json_schema_extra=_for(*METHODS),
    )
    kmeans_init_heads: bool = Field(
        False,
        description="init=kmeans: also set each head to score its k-means centroids (the first "
        "labels are the k-means labels either way)",
        json_schema_extra=_for("sela"),
    )
    manifold_relabels: int = Field(
        0,
        ge=0,
        description="the last N label updates by UMAP + a Gaussian mixture of the pooled "
        "features on rank 0 (unequal, curved clusters) instead of Sinkhorn; DEPICT: one-hot "
        "targets from the embedding's partition instead of balanced soft ones; 0: none",
        json_schema_extra=_for("sela", "depict"),
    )
    manifold_neighbors: int = Field(
        20,
        ge=2,
        description="UMAP n_neighbors of every UMAP + GMM clustering",
        json_schema_extra=_for(*METHODS),
    )
    manifold_dim: int = Field(
        10,
        ge=1,
        description="UMAP output dimensions the Gaussian mixture is fitted in",
        json_schema_extra=_for(*METHODS),
    )
    manifold_restarts: int = Field(
        3,
        ge=1,
        description="Gaussian-mixture EM runs per UMAP + GMM clustering; the most likely is kept",
        json_schema_extra=_for(*METHODS),
    )
    # Only for the first labels: on features trained on labels, the silhouette favours those
    # labels (docs/methods.md).
    manifold_init_candidates: int = Field(
        1,
        ge=1,
        description="first labels by UMAP + GMM (init=manifold_pixels, cluster_init=manifold): "
        "partition N UMAP embeddings (seeds) and keep one by method.manifold_init_select; N "
        "times the cost (~12 s per 10k points each)",
        json_schema_extra=_for(*METHODS),
    )
    manifold_init_select: Literal["silhouette", "consensus"] = Field(
        "silhouette",
        description="which manifold_init_candidates partition is kept: the highest cosine "
        "silhouette, or consensus, the best mean adjusted Rand index to the others (3 or more "
        "candidates)",
        json_schema_extra=_for(*METHODS),
    )
    cluster_init: Literal["kmeans", "manifold"] = Field(
        "kmeans",
        description="first partition of the pretrained embedding: k-means (best of "
        "method.kmeans_restarts) as the papers do, or UMAP + a Gaussian mixture (method."
        "manifold_*), which finds curved clusters that k-means cuts",
        json_schema_extra=_for("dec", "depict", "dgg"),
    )
    pretrain_epochs: int = Field(
        50,
        ge=0,
        description="reconstruction-only epochs (Adam at method.pretrain_lr) before clustering; "
        "optim.epochs counts the clustering epochs after them",
        json_schema_extra=_for("dec", "depict", "dgg"),
    )
    pretrain_lr: float = Field(
        1e-3,
        gt=0,
        description="Adam learning rate of the pretraining phase",
        json_schema_extra=_for("dec", "depict", "dgg"),
    )
    pretrain_dropout: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="pretraining corruption: DEC's input dropout (denoising autoencoder), "
        "DEPICT's noisy-path dropout",
        json_schema_extra=_for("dec", "depict"),
    )
    pixels: Literal["unit", "signed", "standardized"] = Field(
        "unit",
        description="network input: pixels in [0, 1] (unit; DGG's Bernoulli decoder needs it), "
        "in [-1, 1] (signed; DEPICT's decoder then ends in tanh), or standardised as SeLa's",
        json_schema_extra=_for("dec", "depict", "dgg"),
    )
    target: Literal["snapshot", "current"] = Field(
        "snapshot",
        description="targets from the network as of the last refresh (snapshot: the papers', "
        "one extra forward per step) or from the live network, detached (current)",
        json_schema_extra=_for("dec", "depict"),
    )
    kmeans_restarts: int = Field(
        20,
        ge=1,
        description="cluster_init=kmeans: k-means runs on the pretrained embedding; the lowest "
        "objective is kept",
        json_schema_extra=_for("dec", "depict", "dgg"),
    )
    stop_tol: float = Field(
        0.001,
        ge=0,
        le=1,
        description="stop when a refresh changes fewer than this fraction of the labels (DEC's "
        "stopping rule); 0: never",
        json_schema_extra=_for("dec"),
    )
    alpha: float = Field(
        1.0,
        gt=0,
        description="degrees of freedom of DEC's Student-t soft assignment (the paper: 1)",
        json_schema_extra=_for("dec"),
    )
    embed_dim: int = Field(
        10,
        ge=1,
        description="embedding dimensions: the autoencoder's code (DGG: μ̃), which is clustered",
        json_schema_extra=_for("dec", "depict", "dgg"),
    )
    hidden: list[int] = Field(
        default_factory=lambda: [500, 500, 2000],
        min_length=1,
        description="widths of the MLP encoder's hidden layers, mirrored by the decoder",
        json_schema_extra=_for("dec", "dgg"),
    )
    conv_channels: list[int] = Field(
        default_factory=lambda: [50, 50],
        min_length=1,
        description="channels of DEPICT's stride-2 conv layers (decoder mirrored)",
        json_schema_extra=_for("depict"),
    )
    conv_kernels: list[int] = Field(
        default_factory=lambda: [4, 5],
        min_length=1,
        description="kernel sizes of DEPICT's conv layers, one per method.conv_channels entry",
        json_schema_extra=_for("depict"),
    )
    noise_dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="dropout on DEPICT's noisy path in the clustering phase",
        json_schema_extra=_for("depict"),
    )
    # The embedding learns to ignore the transformation; set the augment section for the data
    # (digits want no flips and no colour jitter).
    noise_augment: bool = Field(
        False,
        description="clustering phase: DEPICT's noisy path reads a random crop / rotation of "
        "each image (the augment section); the clean path, its targets and the reconstruction "
        "targets keep the plain image",
        json_schema_extra=_for("depict"),
    )
    target_power: float = Field(
        2.0,
        gt=0,
        description="exponent a of DEPICT's target q ∝ (p / √Σp)^a: 2 (p² / Σp) is the authors' "
        "code; 1, the paper's eq. 7, does not sharpen and drifts to soft predictions",
        json_schema_extra=_for("depict"),
    )
    recon_hidden_weight: float = Field(
        0.1,
        ge=0,
        description="weight of DEPICT's hidden-layer reconstruction terms against the input's "
        "(the authors' code: 0.1; eq. 9: 1)",
        json_schema_extra=_for("depict"),
    )
    head_fit_steps: int = Field(
        500,
        ge=0,
        description="full-batch Adam steps that fit the softmax head (DGG: the classifier) to "
        "the first partition",
        json_schema_extra=_for("depict", "dgg"),
    )
    knn_k: int = Field(
        10,
        ge=1,
        description="neighbours per sample in DGG's k-NN graph of the pretrained embedding",
        json_schema_extra=_for("dgg"),
    )
    sigma_rank: int | None = Field(
        None,
        ge=1,
        description="DGG's graph weights: σ_i = the distance to this neighbour (<= "
        "method.knn_k); null: the k-th",
        json_schema_extra=_for("dgg"),
    )
    graph_weight: float = Field(
        1.0,
        ge=0,
        description="weight of DGG's graph term Σ w_ij JS(γ_i‖γ_j) against the ELBO",
        json_schema_extra=_for("dgg"),
    )

    @model_validator(mode="after")
    def _kmeans_heads(self) -> MethodConfig:
        if self.kmeans_init_heads and self.init != "kmeans":
            raise ValueError("kmeans_init_heads needs init=kmeans (heads read backbone features)")
        if self.manifold_relabels > self.relabels:
            raise ValueError(
                f"method.manifold_relabels={self.manifold_relabels} exceeds method.relabels="
                f"{self.relabels}: it counts the last label updates"
            )
        if self.cluster_init == "manifold" and self.name == "sela":
            raise ValueError(
                "method.cluster_init partitions DEC/DEPICT/DGG's pretrained embedding; SeLa's "
                "first labels come from method.init (e.g. init=manifold_pixels)"
            )
        manifold = (
            self.manifold_relabels > 0
            or self.init == "manifold_pixels"
            or self.cluster_init == "manifold"
        )
        if manifold and self.clusters > 1000:
            raise ValueError(
                f"manifold clustering (UMAP + a Gaussian mixture on rank 0) is for up to 1000 "
                f"clusters, got method.clusters={self.clusters}: use Sinkhorn label updates "
                "(method.manifold_relabels=0) and init=kmeans or random"
            )
        first_manifold = self.init == "manifold_pixels" or self.cluster_init == "manifold"
        if self.manifold_init_candidates > 1 and not first_manifold:
            raise ValueError(
                f"method.manifold_init_candidates={self.manifold_init_candidates} chooses among "
                f"first partitions by UMAP + GMM, but init={self.init} and cluster_init="
                f"{self.cluster_init}: set method.init=manifold_pixels (sela) or "
                "method.cluster_init=manifold (dec/depict/dgg), or drop manifold_init_candidates"
            )
        if self.manifold_init_select == "consensus" and self.manifold_init_candidates == 2:
            raise ValueError(
                "method.manifold_init_select=consensus keeps the candidate that agrees best "
                "with the others, which needs 3 or more: set method.manifold_init_candidates "
                ">= 3, or method.manifold_init_select=silhouette"
            )
        if self.init == "manifold_pixels" and self.name != "sela":
            raise ValueError(
                "method.init=manifold_pixels is SeLa's (method.name=sela); DEC/DEPICT/DGG "
                "partition their pretrained embedding: method.cluster_init=manifold"
            )
        if self.manifold_relabels and self.name not in ("sela", "depict"):
            raise ValueError(
                f"method.manifold_relabels is for sela and depict (hard targets); {self.name}'s "
                "targets are soft by its paper: set method.manifold_relabels=0"
            )
        if self.noise_augment and self.name != "depict":
            raise ValueError(
                f"method.noise_augment augments DEPICT's noisy path; {self.name} has none: "
                "set method.noise_augment=false"
            )
        if self.name != "sela":
            if self.heads != 1:
                raise ValueError(
                    f"method.name={self.name} has one clustering layer: set method.heads=1 "
                    f"(got {self.heads}; several heads are SeLa's)"
                )
            if self.name == "dgg" and self.pixels != "unit":
                raise ValueError(
                    "method.name=dgg has a Bernoulli decoder that needs pixels in [0, 1]: "
                    "set method.pixels=unit"
                )
            if self.name == "depict" and len(self.conv_channels) != len(self.conv_kernels):
                raise ValueError("method.conv_channels and method.conv_kernels differ in length")
            if self.sigma_rank is not None and self.sigma_rank > self.knn_k:
                raise ValueError(f"method.sigma_rank must be <= method.knn_k={self.knn_k}")
        return self

    # Runs after _kmeans_heads, whose messages say more for the keys it checks.
    @model_validator(mode="after")
    def _keys_of_other_methods(self, info: ValidationInfo) -> MethodConfig:
        if not (info.context or {}).get(_USER_KEYS):
            return self
        for key in sorted(self.model_fields_set - _UNCHECKED_KEYS):
            field = type(self).model_fields[key]
            owners = key_methods(field)
            # At its default the key changes nothing: RUN_DIR/config.yaml holds every key so.
            if self.name in owners or getattr(self, key) == field.get_default(
                call_default_factory=True
            ):
                continue
            names = " and ".join(owners)
            fix = " or ".join(f"method.name={m}" for m in owners)
            raise ValueError(
                f"method.{key} is a key of {names} (method.name={self.name}): remove it or set "
                f"{fix}"
            )
        return self


class AugmentConfig(_Section):
    crop_scale: tuple[float, float] = Field(
        (0.2, 1.0),
        description="random-resized-crop area as a fraction of the image: [low, high]",
        json_schema_extra=_for("sela", "depict"),
    )
    crop_ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3),
        description="crop aspect ratio (width / height), drawn log-uniformly in [low, high]",
        json_schema_extra=_for("sela", "depict"),
    )
    rotation: float = Field(
        0.0,
        ge=0,
        le=180,
        description="largest rotation in degrees (uniform in ±rotation); 0: none",
        json_schema_extra=_for("sela", "depict"),
    )
    hflip: float = Field(
        0.5,
        ge=0,
        le=1,
        description="probability of a horizontal flip (0 for digits and text)",
        json_schema_extra=_for("sela", "depict"),
    )
    brightness: float = Field(
        0.4,
        ge=0,
        description="colour jitter: brightness factor drawn in [1 - b, 1 + b]",
        json_schema_extra=_for("sela", "depict"),
    )
    contrast: float = Field(
        0.4,
        ge=0,
        description="colour jitter: contrast factor drawn in [1 - c, 1 + c]",
        json_schema_extra=_for("sela", "depict"),
    )
    saturation: float = Field(
        0.4,
        ge=0,
        description="colour jitter: saturation factor drawn in [1 - s, 1 + s] (no effect on grey "
        "images)",
        json_schema_extra=_for("sela", "depict"),
    )
    grayscale: float = Field(
        0.2,
        ge=0,
        le=1,
        description="probability of turning the image grey",
        json_schema_extra=_for("sela", "depict"),
    )
    jitter_p: float = Field(
        0.8,
        ge=0,
        le=1,
        description="probability that the colour jitter (brightness, contrast, saturation) is "
        "applied at all",
        json_schema_extra=_for("sela", "depict"),
    )
    where: Literal["device", "loader"] = Field(
        "device",
        description="device: batched on the training device after loading (GPU-friendly, "
        "needs images of one size); loader: per sample in the DataLoader workers with OpenCV, "
        "for large JPEGs (SeLa only)",
        json_schema_extra=_for("sela"),
    )

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError("crop_ratio must satisfy 0 < low <= high")
        return self


class OptimConfig(_Section):
    name: Literal["sgd", "adam"] = Field(
        "sgd",
        description="optimiser: SGD (optim.momentum, optim.nesterov) or Adam; dec/depict/dgg: "
        "of the clustering phase (pretraining uses Adam at method.pretrain_lr)",
    )
    epochs: int = Field(
        400,
        ge=1,
        description="training epochs; dec/depict/dgg: of the clustering phase, after "
        "method.pretrain_epochs",
    )
    batch_size: int = Field(
        256,
        ge=1,
        description="global batch, split evenly over trainer.num_workers; part of the run's "
        "identity (cannot change on resume)",
    )
    lr: float = Field(
        0.05,
        gt=0,
        description="peak learning rate; scale it with the batch (× batch_size / 256) when "
        "scaling out",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="SGD: Nesterov momentum")
    weight_decay: float = Field(1e-5, ge=0, description="L2 weight decay (SGD and Adam)")
    schedule: Literal["step", "cosine", "constant"] = Field(
        "step",
        description="learning rate after the warm-up: step (× optim.gamma at each milestone), "
        "cosine (to 0 at the end), or constant",
    )
    milestones: list[float] = Field(
        default_factory=lambda: [0.4, 0.75, 0.95],
        description="step schedule: fractions of training at which the learning rate is "
        "multiplied by optim.gamma (of 400 epochs: 160, 300, 380)",
    )
    gamma: float = Field(
        0.1, gt=0, le=1, description="step schedule: factor applied at each milestone"
    )
    warmup_steps: int = Field(
        0,
        ge=0,
        description="steps of linear warm-up to optim.lr (above a global batch of ~1024: about "
        "5 epochs of steps)",
    )
    grad_clip: float | None = Field(
        None,
        gt=0,
        description="clip the gradients' global L2 norm to this; null: no clipping (set it when "
        "the loss turns non-finite)",
    )


class TrainerConfig(_Section):
    num_workers: int = Field(
        2,
        ge=1,
        description="Ray Train workers, one process each (with use_gpu: one per GPU); may "
        "change between resumes",
    )
    use_gpu: bool = Field(False, description="give every worker one GPU")
    cpus_per_worker: int = Field(
        1,
        ge=1,
        description="CPUs Ray reserves per worker, its DataLoader processes included (see "
        "data.loader_workers=-1)",
    )
    max_failures: int = Field(
        3,
        ge=-1,
        description="restarts after worker or node failures (preemptions not counted); "
        "-1: unlimited",
    )
    max_preemptions: int = Field(
        -1,
        ge=-1,
        description="restarts after spot/preemptible nodes are reclaimed; -1: unlimited",
    )
    preemption_check_every: int = Field(
        10,
        ge=0,
        description="steps between checks for a preemption notice, which triggers a "
        "just-in-time checkpoint (each check is a barrier over the ranks); 0: off",
    )
    log_every: int = Field(
        20, ge=1, description="steps between metrics.jsonl lines and progress reports"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="SeLa's autocast: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32",
        json_schema_extra=_for("sela"),
    )
    channels_last: bool = Field(
        True,
        description="CUDA: channels_last memory format for the ResNet (faster convolutions "
        "in bf16); ignored on CPU",
        json_schema_extra=_for("sela"),
    )
    compile: bool = Field(
        False,
        description="torch.compile the model (CUDA only)",
        json_schema_extra=_for("sela"),
    )


class CheckpointConfig(_Section):
    every_steps: int = Field(
        0,
        ge=0,
        description="also checkpoint every N steps, which bounds the work a failure or "
        "preemption loses; 0: at epoch ends only",
    )
    keep_last: int = Field(2, ge=1, description="checkpoints kept (the older are deleted)")
    after_relabel: bool = Field(
        True,
        description="checkpoint right after each label update, so that a restart never redoes "
        "a full label pass",
    )


class RayConfig(_Section):
    address: str | None = Field(
        None,
        description="Ray cluster to join ('auto': the one this node belongs to); null: start a "
        "local one",
    )
    storage_path: str | None = Field(
        None,
        description="Ray Train's storage (a path every node sees, or an s3:// / gs:// URI); "
        "null: RUN_DIR/ray",
    )
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="CPUs of a local cluster; null: the machine's, or the workers' total if more",
    )


class WandbConfig(_Section):
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description="W&B logging: offline (into RUN_DIR/wandb, for `wandb sync`), online (needs "
        "WANDB_API_KEY), or disabled",
    )
    project: str = Field("selfclust", description="W&B project")
    entity: str | None = Field(None, description="W&B team or user; null: the API key's default")
    tags: list[str] = Field(default_factory=list, description="W&B run tags")


class RunConfig(_Section):
    seed: int = Field(
        0,
        ge=0,
        description="random seed of the initial weights, the first labels, the clustering "
        "samples, the augmentations and the shard order",
    )
    data: DataConfig = Field(
        default_factory=DataConfig, description="what to train and evaluate on"
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="SeLa's network; dec/depict/dgg build their papers' nets from method.*",
        json_schema_extra=_for("sela"),
    )
    method: MethodConfig = Field(
        default_factory=MethodConfig,
        description="the clustering method, its label updates and its networks",
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="SeLa's training augmentations (and DEPICT's method.noise_augment views)",
        json_schema_extra=_for("sela", "depict"),
    )
    optim: OptimConfig = Field(
        default_factory=OptimConfig,
        description="optimiser and learning-rate schedule (dec/depict/dgg: of the clustering "
        "phase)",
    )
    trainer: TrainerConfig = Field(
        default_factory=TrainerConfig,
        description="Ray Train workers, restarts, logging and GPU settings",
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig,
        description="when checkpoints are written and how many are kept",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="the Ray cluster to run on")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases logging")

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.method.name != "sela" and self.augment.where == "loader":
            raise ValueError(
                f"augment.where=loader crops in the loader workers for SeLa; method.name="
                f"{self.method.name} needs the plain images (DEPICT's method.noise_augment "
                "augments on the device): set augment.where=device"
            )
        workers = max(1, self.trainer.num_workers)
        if self.optim.batch_size % workers:
            raise ValueError(
                f"optim.batch_size={self.optim.batch_size} is not divisible by "
                f"trainer.num_workers={workers}; the global batch is split evenly over workers"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self, keys: tuple[str, ...] = ("data", "model", "method")) -> str:
        """Hash of the sections that define what a checkpoint *is* (not how it is run)."""
        sub = {k: self.to_dict()[k] for k in keys}
        return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(config)"
        if e["type"] == "extra_forbidden":
            section: type[BaseModel] = RunConfig
            for part in e["loc"][:-1]:
                ann = section.model_fields[str(part)].annotation
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    section = ann
            allowed = ", ".join(section.model_fields)
            lines.append(f"{key}: unknown key (allowed here: {allowed})")
        else:
            given = e.get("input")
            lines.append(f"{key}: {e['msg']} (got {given!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.1", "model.widths=[16,32]"]`` → nested dict; values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.1)")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else None)
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def build_config(tree: dict[str, Any]) -> RunConfig:
    """Validate a config a person wrote (checked for keys of another method, unlike a resolved
    config read back with ``RunConfig.model_validate``)."""
    try:
        return RunConfig.model_validate(tree, context={_USER_KEYS: True})
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (None: defaults), apply ``key=value`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (configs live in configs/*.yaml)")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(loaded)}")
        tree = loaded or {}
    tree = _merge(tree, parse_overrides(overrides or []))
    return build_config(tree)


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        name = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, name + ".")
        elif va != vb:
            out.append(f"{name}: {va!r} -> {vb!r}")
    return out


def method_defaults(method: str = "sela") -> RunConfig:
    """The defaults of every key for ``method.name=method`` (one head for dec/depict/dgg)."""
    if method not in METHODS:
        raise ConfigError(f"method.name={method!r}: choose one of {', '.join(METHODS)}")
    tree: dict[str, Any] = {"name": method}
    if method != "sela":
        tree["heads"] = 1  # one clustering layer; see MethodConfig._kmeans_heads
    return build_config({"method": tree})
