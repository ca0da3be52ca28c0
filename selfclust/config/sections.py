"""The sections of the run config other than ``method``: one pydantic model per component.

A key that only some methods read says which in ``json_schema_extra={"methods": [...]}``
(none: every method); ``selfclust config --method NAME`` and docs/config.md read it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo

from selfclust.config.method_base import METHODS


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
    small_stem: bool = Field(
        True,
        description="resnet18/resnet50: a 3x3 stride-1 stem without max-pool, for 16-32 px images "
        "(CIFAR-style); false: ImageNet's 7x7 stride-2 conv and max-pool",
        json_schema_extra=_for("sela"),
    )


# Not yet checked by _keys_of_other_methods: tests/methods/test_runner.py's SHORT recipe sets
# both for dec and dgg alike (pretrain_dropout is not DGG's, head_fit_steps not DEC's).
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
    jitter: float = Field(
        0.4,
        ge=0,
        description="colour jitter strength j: brightness, contrast and saturation factors each "
        "drawn in [1 - j, 1 + j] (saturation: colour images only)",
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
        description="probability that the colour jitter (augment.jitter) is applied at all",
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
        description="optimiser: SGD (momentum 0.9) or Adam; dec/depict/dgg: "
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
    weight_decay: float = Field(1e-5, ge=0, description="L2 weight decay (SGD and Adam)")
    schedule: Literal["step", "cosine", "constant"] = Field(
        "step",
        description="learning rate after the warm-up: step (× 0.1 at each milestone), "
        "cosine (to 0 at the end), or constant",
    )
    milestones: list[float] = Field(
        default_factory=lambda: [0.4, 0.75, 0.95],
        description="step schedule: fractions of training at which the learning rate is "
        "multiplied by 0.1 (of 400 epochs: 160, 300, 380)",
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
        description="CPUs Ray reserves per worker: the training process and "
        "cpus_per_worker - 1 DataLoader processes that read and decode shards (raise it when "
        "the GPU waits on data)",
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
    log_every: int = Field(
        20, ge=1, description="steps between metrics.jsonl lines and progress reports"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="SeLa's training autocast: auto (bf16 on a GPU that runs it natively, "
        "compute capability >= 8.0; else fp32), bf16 or fp32; label passes embed in fp32",
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


class WandbConfig(_Section):
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description="W&B logging: offline (into RUN_DIR/wandb, for `wandb sync`), online (needs "
        "WANDB_API_KEY), or disabled",
    )
    project: str = Field(
        "selfclust", description="W&B project (the team or user: WANDB_ENTITY, or the API key's)"
    )
    tags: list[str] = Field(default_factory=list, description="W&B run tags")
