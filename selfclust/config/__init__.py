"""Typed, validated run configuration.

One pydantic model per component (:mod:`~selfclust.config.sections`), the ``method`` section
chosen by ``method.name`` (:mod:`~selfclust.config.methods`), composed into :class:`RunConfig`
(:mod:`~selfclust.config.run`). YAML files only override the defaults; ``key=value``
command-line overrides are applied on top (``optim.lr=0.1``). Unknown keys, bad values and keys
of another method raise :class:`ConfigError` naming the key and what is allowed; keys that
experiments settled are constants in the code (:mod:`~selfclust.config.fixed`). The resolved
config is stored in every checkpoint and sent to W&B. ``selfclust config`` and docs/config.md
are generated from this schema (:mod:`~selfclust.config.doc`).
"""

from selfclust.config.fixed import FIXED, RemovedKeyWarning
from selfclust.config.load import load_config, parse_overrides
from selfclust.config.method_base import METHODS, MethodBase, expect
from selfclust.config.methods import (
    BY_NAME,
    DecMethod,
    DepictMethod,
    DggMethod,
    MethodConfig,
    PretrainedConfig,
    PretrainedMethod,
    SelaMethod,
    key_owners,
    method_keys,
)
from selfclust.config.run import (
    ConfigError,
    RunConfig,
    build_config,
    diff_configs,
    method_defaults,
)
from selfclust.config.sections import (
    AugmentConfig,
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    TrainerConfig,
    WandbConfig,
    key_methods,
)

__all__ = [
    "BY_NAME",
    "FIXED",
    "METHODS",
    "AugmentConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DecMethod",
    "DepictMethod",
    "DggMethod",
    "MethodBase",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainedConfig",
    "PretrainedMethod",
    "RayConfig",
    "RemovedKeyWarning",
    "RunConfig",
    "SelaMethod",
    "TrainerConfig",
    "WandbConfig",
    "build_config",
    "diff_configs",
    "expect",
    "key_methods",
    "key_owners",
    "load_config",
    "method_defaults",
    "method_keys",
    "parse_overrides",
]
