"""Typed, validated run configuration.

One pydantic model per component, composed into :class:`RunConfig`. YAML files only override
the defaults; ``key=value`` command-line overrides are applied on top (``optim.lr=0.1``).
Unknown keys and bad values raise :class:`ConfigError` naming the key and what is allowed.
The resolved config is stored in every checkpoint and sent to W&B.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    train: str = Field(
        "mnist_test", description="shard dir (from `selfclust shard`) or built-in name"
    )
    eval: str | None = Field(
        None, description="shards for evaluation; default: the training shards"
    )
    image_size: int | None = Field(None, gt=0, description="resize images to this square size")
    loader_workers: int = Field(
        0, ge=-1, description="DataLoader worker processes per rank; -1: cpus_per_worker - 1"
    )
    shuffle_buffer: int = Field(2000, ge=0)
    io_timeout_s: float = Field(
        30.0,
        gt=0,
        description="seconds a shard read may stall (or a missing URL retry) before it fails",
    )


class ModelConfig(_Section):
    arch: Literal["resnet18", "resnet50", "small_resnet"] = "resnet18"
    # small_resnet only: channels of its three stages (BasicBlocks from torchvision).
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    blocks: int = Field(1, ge=1, description="small_resnet: BasicBlocks per stage")
    # 3x3 stride-1 stem without max-pool, for 16-32 px inputs (CIFAR-style).
    small_stem: bool = True


class MethodConfig(_Section):
    # sela: Sinkhorn pseudo-labels on a ResNet (model.*). dec / depict / dgg: the papers' own
    # nets (model.* is not used), pretraining then clustering; see docs/methods.md.
    name: Literal["sela", "dec", "depict", "dgg"] = "sela"
    heads: int = Field(10, ge=1, description="T clustering heads (SeLa: 10)")
    clusters: int = Field(3000, ge=2, description="K clusters per head (SeLa ImageNet: 3000)")
    lam: float = Field(25.0, gt=0, le=100, description="Sinkhorn λ (SeLa: 25)")
    sinkhorn_tol: float = Field(1e-3, gt=0)
    sinkhorn_max_iters: int = Field(1000, ge=1)
    # stored: each head's [n_r, K] logits are held during its Sinkhorn solve (peak: features +
    # 2 blocks); recomputed: rebuilt from the features in row chunks whenever the solver reads
    # them (peak: features + 1 block, one n_r x D x K product per kernel rebuild; for GPUs
    # short of memory). Linear heads only; results equal up to float rounding.
    sinkhorn_logits: Literal["stored", "recomputed"] = "stored"
    relabels: int = Field(80, ge=1, description="label updates over the run (SeLa: 80)")
    relabel_power: float = Field(2.0, gt=0, description="spacing of updates; 2 = SeLa's quadratic")
    relabel_start: float = Field(
        0.0, ge=0, lt=1, description="fraction of training before the first update"
    )
    # Initial labels: faiss k-means on the (untrained) backbone's pooled features, on raw-pixel
    # thumbnails (kmeans_pixel_size² per channel), or SeLa's random equal-size labels.
    # manifold_pixels: UMAP + Gaussian mixture on the thumbnails (see selfclust/labels/manifold.py).
    init: Literal["kmeans", "kmeans_pixels", "manifold_pixels", "random"] = "random"
    kmeans_pixel_size: int = Field(16, ge=1)
    kmeans_samples: int = Field(
        100_000, ge=1, description="features sampled (over all ranks) for k-means"
    )
    kmeans_iters: int = Field(25, ge=1, description="Lloyd iterations of the k-means init")
    # Starting centroids of every k-means (init=kmeans/kmeans_pixels, cluster_init=kmeans):
    # random points, k-means++, or AFK-MC² (k-means++ approximated by Markov chains; faiss).
    kmeans_seeding: Literal["random", "kmeans++", "afkmc2"] = "random"
    # Stop Lloyd early after an iteration that lowers the objective by less than this fraction
    # of it (faiss's early_stop_threshold); 0: always kmeans_iters. Note that at small K the
    # objective can plateau for an iteration and then fall again.
    kmeans_tol: float = Field(0.0, ge=0, lt=1, description="relative objective change to stop")
    # init=kmeans only: also set each head to score its k-means centroids (the first labels
    # are the k-means labels either way); the heads read the same pooled features.
    kmeans_init_heads: bool = False
    # The last `manifold_relabels` label updates cluster the backbone's pooled features with
    # UMAP + a Gaussian mixture on a global sample of kmeans_samples (rank 0, CPU; the rest by
    # k-NN vote) instead of Sinkhorn: unequal cluster sizes, curved clusters. DEPICT: the last
    # refreshes take the partition of the embedding (ids matched to the head's) as one-hot
    # targets instead of the balanced soft ones (sela and depict only).
    manifold_relabels: int = Field(0, ge=0, description="last label updates done by UMAP + GMM")
    manifold_neighbors: int = Field(20, ge=2, description="UMAP n_neighbors")
    manifold_dim: int = Field(10, ge=1, description="UMAP output dimensions")
    manifold_restarts: int = Field(3, ge=1, description="Gaussian-mixture EM runs; best kept")
    # init=manifold_pixels / cluster_init=manifold: each UMAP embedding (seed) gives its own
    # partition of the pixels (of the pretrained embedding); with N > 1 candidates one is kept
    # (N times the cost: ~12 s per 10k points): by default the one with the highest cosine
    # silhouette, or (select=consensus) the one that agrees best with the others (mean
    # adjusted Rand index; 3 or more candidates). Only for the first labels: on features
    # trained on labels, the silhouette favours those labels (see docs/methods.md).
    manifold_init_candidates: int = Field(
        1, ge=1, description="UMAP + GMM partitions to choose the first labels from"
    )
    manifold_init_select: Literal["silhouette", "consensus"] = "silhouette"
    # --- dec / depict / dgg (ignored by sela). The first partition of the pretrained embedding:
    # k-means as the papers do, or UMAP + a Gaussian mixture (manifold_* keys; N2D's
    # observation that it finds curved clusters k-means cuts; a selfclust variant).
    cluster_init: Literal["kmeans", "manifold"] = "kmeans"
    # Refreshes reuse relabels / relabel_power / relabel_start, counted over the clustering
    # phase (optim.epochs), after pretraining.
    pretrain_epochs: int = Field(
        50, ge=0, description="reconstruction-only epochs before clustering (Adam)"
    )
    pretrain_lr: float = Field(1e-3, gt=0)
    pretrain_dropout: float = Field(
        0.2, ge=0, lt=1, description="pretraining input corruption (DEC) / noise (DEPICT)"
    )
    pixels: Literal["unit", "signed", "standardized"] = Field(
        "unit",
        description="network input: pixels in [0, 1], in [-1, 1] (DEPICT's decoder then ends "
        "in tanh), or standardised as SeLa's",
    )
    target: Literal["snapshot", "current"] = Field(
        "snapshot",
        description="targets from the network as of the last refresh (exact) or the live one",
    )
    kmeans_restarts: int = Field(20, ge=1, description="k-means runs on the embedding; best kept")
    stop_tol: float = Field(
        0.001, ge=0, le=1, description="DEC: stop when fewer assignments change (0: never)"
    )
    alpha: float = Field(1.0, gt=0, description="DEC: Student-t degrees of freedom")
    embed_dim: int = Field(10, ge=1)
    hidden: list[int] = Field(
        default_factory=lambda: [500, 500, 2000], min_length=1, description="DEC/DGG MLP widths"
    )
    conv_channels: list[int] = Field(default_factory=lambda: [50, 50], min_length=1)
    conv_kernels: list[int] = Field(default_factory=lambda: [4, 5], min_length=1)
    noise_dropout: float = Field(0.1, ge=0, lt=1, description="DEPICT: noisy-path dropout")
    # DEPICT, clustering phase: the noisy path's input is also a random crop / rotation of the
    # image (the `augment` section, per sample and epoch; set it for the data: digits want no
    # flips and no colour jitter); the clean path, its targets and the reconstruction targets
    # stay the plain image, so the embedding learns to ignore the transformation.
    noise_augment: bool = Field(False, description="DEPICT: augment the noisy path's input")
    # DEPICT's target q ∝ (p / √Σp)^a: a = 1 is the paper's eq. 7, which does not sharpen and
    # drifts to soft predictions; 2 (p² / Σp) is the authors' released code.
    target_power: float = Field(2.0, gt=0, description="DEPICT: target exponent a")
    recon_hidden_weight: float = Field(
        0.1, ge=0, description="DEPICT: hidden layers' reconstruction weight (1 = eq. 9)"
    )
    head_fit_steps: int = Field(
        500, ge=0, description="DEPICT/DGG: fit the softmax head to the k-means labels"
    )
    knn_k: int = Field(10, ge=1, description="DGG: neighbours per sample in the graph")
    sigma_rank: int | None = Field(None, ge=1, description="DGG: σ_i = this neighbour's distance")
    graph_weight: float = Field(1.0, ge=0, description="DGG: weight of the graph term")

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


class AugmentConfig(_Section):
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = Field(0.0, ge=0, le=180, description="max rotation in degrees")
    hflip: float = Field(0.5, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.4, ge=0)
    grayscale: float = Field(0.2, ge=0, le=1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    # device: batched on the training device after loading (GPU-friendly, needs equal-size
    # images); loader: per sample in DataLoader workers with OpenCV (large JPEGs).
    where: Literal["device", "loader"] = "device"

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError("crop_ratio must satisfy 0 < low <= high")
        return self


class OptimConfig(_Section):
    # dec / depict / dgg: the clustering phase's optimiser (pretraining uses Adam).
    name: Literal["sgd", "adam"] = "sgd"
    epochs: int = Field(400, ge=1, description="epochs (dec/depict/dgg: after pretraining)")
    batch_size: int = Field(256, ge=1, description="global batch, split evenly over workers")
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-5, ge=0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    # step schedule: multiply by `gamma` at these fractions of training (SeLa: 160/300/380 of 400).
    milestones: list[float] = Field(default_factory=lambda: [0.4, 0.75, 0.95])
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)


class TrainerConfig(_Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each)")
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    max_failures: int = Field(
        3, ge=-1, description="restarts after worker/node failures; -1 = unlimited"
    )
    max_preemptions: int = Field(
        -1, ge=-1, description="restarts after spot/preemptible node reclaims; -1 = unlimited"
    )
    preemption_check_every: int = Field(
        10, ge=0, description="steps between preemption-notice checks (a barrier; 0 = off)"
    )
    log_every: int = Field(20, ge=1, description="steps between metrics.jsonl lines")
    # GPU path (ignored on CPU): bf16 autocast, channels_last memory format, torch.compile.
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the model (CUDA only)")


class CheckpointConfig(_Section):
    every_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: epochs only)")
    keep_last: int = Field(2, ge=1)
    after_relabel: bool = Field(
        True, description="checkpoint right after each label update (a restart never redoes one)"
    )


class RayConfig(_Section):
    address: str | None = Field(None, description="join this cluster ('auto'); default: local")
    storage_path: str | None = Field(None, description="Ray storage; default RUN_DIR/ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster")


class WandbConfig(_Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "selfclust"
    entity: str | None = None
    tags: list[str] = Field(default_factory=list)


class RunConfig(_Section):
    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

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
    try:
        return RunConfig.model_validate(tree)
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
