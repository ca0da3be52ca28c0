"""The run config: the sections composed into :class:`RunConfig`, and how they are checked.

A config a person wrote (:func:`~selfclust.config.load.load_config`, :func:`build_config`)
is checked strictly: a ``method.*`` key of another method is an error naming the method it
belongs to, and a key that is now fixed in the code (:mod:`selfclust.config.fixed`) is an
error unless it holds the fixed value. A resolved config read back (a checkpoint's,
RUN_DIR/config.yaml, with ``RunConfig.model_validate``) may come from an older selfclust that
held every method's keys: the keys its method does not read are dropped, since they never did
anything.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from selfclust.config.fixed import (
    FIXED,
    HOW_RUN,
    RemovedKeyWarning,
    fixed_error,
    merge_keys,
    not_a_key,
    reads,
)
from selfclust.config.method_base import METHODS
from selfclust.config.methods import BY_NAME, MethodConfig, SelaMethod, key_owners
from selfclust.config.sections import (
    AugmentConfig,
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    TrainerConfig,
    WandbConfig,
    _for,
    _Section,
)
from selfclust.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the key."""


class RunConfig(_Section):
    seed: int = Field(
        0,
        ge=0,
        description="random seed of the initial weights, the first labels, the clustering "
        "samples, the augmentations and the shard order",
    )
    recipe: Literal["auto", "none"] = Field(
        "none",
        description="auto: SeLa's one recipe (configs/sela.yaml) derives every data-dependent "
        "key the config does not set (training length, crops, flips, colour, network, sample "
        "sizes) from the shards' N, image size and channels and method.clusters "
        "(docs/recipe.md); none: the keys' defaults",
        json_schema_extra=_for("sela"),
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
        default_factory=SelaMethod,
        description="the clustering method (chosen by method.name), its label updates and "
        "its networks",
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

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # A resolved config read back: lenient. build_config resolved a person's config
            # strictly already, and resolving a resolved tree changes nothing.
            return resolve_keys(data, strict=False)
        return data

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


# What a user who set another method's key most likely wants instead.
_HINTS = {
    "init": " (DEC/DEPICT/DGG's first partition: method.cluster_init, e.g. manifold)",
    "cluster_init": " (SeLa's first labels: method.init, e.g. manifold_pixels)",
}


def _owner_default(key: str, owners: tuple[str, ...]) -> list[Any]:
    fields = (BY_NAME[m].model_fields[key] for m in owners)
    return [f.get_default(call_default_factory=True) for f in fields]


def resolve_keys(tree: dict[str, Any], strict: bool) -> dict[str, Any]:
    """``tree`` without the keys its method does not read and without fixed keys at their
    value. ``strict`` (a config a person wrote): a key of another method not at its default,
    or a fixed key at another value, raises :class:`ConfigError`; otherwise (a resolved config)
    keys of another method are dropped whatever their value."""
    tree = copy.deepcopy(tree)
    method = tree.get("method")
    if method is None:
        method = tree["method"] = {}
    if not isinstance(method, dict):
        return tree  # pydantic says what is wrong
    name = method.setdefault("name", "sela")
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r}: choose one of {', '.join(METHODS)}")
    merged = merge_keys(tree, strict)
    if merged:
        raise ConfigError(merged)
    for section, keys in list(tree.items()):
        if not isinstance(keys, dict):
            continue
        for key in list(keys):
            dotted = f"{section}.{key}"
            entry = FIXED.get(dotted)
            if entry is None or (section == "method" and key in BY_NAME[name].model_fields):
                continue
            value = keys.pop(key)
            if value == entry.value:
                if strict:
                    warnings.warn(
                        f"{not_a_key(dotted, name)} (always {entry.value!r}): delete it",
                        RemovedKeyWarning,
                        stacklevel=3,
                    )
            elif strict or (
                reads(entry, name) and value not in entry.legacy and section not in HOW_RUN
            ):  # an older run dir: what defines the run must still mean the same
                raise ConfigError(fixed_error(dotted, value, entry, name))
    for key in list(method):
        owners = key_owners(key)
        if name in owners or not owners:
            continue  # its own key, or unknown: pydantic names the allowed keys
        if not strict or method[key] in _owner_default(key, owners):
            del method[key]  # at its default it changes nothing (old RUN_DIR/config.yaml)
            continue
        fix = " or ".join(f"method.name={m}" for m in owners)
        names = " and ".join([", ".join(owners[:-1]), owners[-1]] if len(owners) > 1 else owners)
        raise ConfigError(
            f"method.{key} is a key of {names} (method.name={name}): remove it or set "
            f"{fix}{_HINTS.get(key, '')}"
        )
    return tree


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        section: type[BaseModel] = RunConfig
        if loc[:1] == ["method"] and len(loc) > 1 and loc[1] in BY_NAME:
            section = BY_NAME[loc.pop(1)]  # the union's tag: method.<name>.<key>
            loc_parts = loc[1:-1]
        else:
            loc_parts = loc[:-1]
        key = ".".join(loc) or "(config)"
        if e["type"] == "extra_forbidden":
            for part in loc_parts:
                ann = section.model_fields[part].annotation
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    section = ann
            allowed = ", ".join(section.model_fields)
            lines.append(f"{key}: unknown key (allowed here: {allowed})")
        else:
            given = e.get("input")
            lines.append(f"{key}: {e['msg']} (got {given!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(tree: dict[str, Any]) -> RunConfig:
    """Validate a config a person wrote (strictly, unlike a resolved config read back with
    ``RunConfig.model_validate``)."""
    tree = resolve_keys(tree, strict=True)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    _check_sela_trainer_keys(cfg)
    return cfg


def _check_sela_trainer_keys(cfg: RunConfig) -> None:
    """DEC, DEPICT and DGG train their small nets uncompiled and in fp32: torch.compile and
    the bf16 autocast wrap SeLa's forward only, so asking for them elsewhere is an error."""
    name, t = cfg.method.name, cfg.trainer
    if name == "sela":
        return
    if t.compile:
        raise ConfigError(
            f"trainer.compile=true compiles SeLa's network only; method.name={name} trains "
            "uncompiled: remove trainer.compile"
        )
    if t.precision == "bf16":
        raise ConfigError(
            f"trainer.precision=bf16 is SeLa's autocast; method.name={name} trains in fp32: "
            "remove trainer.precision"
        )


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
    """The defaults of every key for ``method.name=method``."""
    if method not in METHODS:
        raise ConfigError(f"method.name={method!r}: choose one of {', '.join(METHODS)}")
    return build_config({"method": {"name": method}})
