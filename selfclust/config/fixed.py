"""Keys that were once in the config and are now fixed in the code.

Each was an experiment's knob that the experiment settled, or a value that is derived. A
config that still sets one to the fixed value loads (with a :class:`RemovedKeyWarning`); any
other value is an error that says where the value now lives and why it is fixed. Checkpoints
and run dirs written before the key was removed hold it at its default, which is the fixed
value, so they keep loading. ``tests/test_config_fixed.py`` checks every value against the
code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from selfclust.config.methods import key_owners
from selfclust.config.sections import AugmentConfig


class RemovedKeyWarning(UserWarning):
    """A config sets a key that is now fixed, to its fixed value: delete the line."""


@dataclass(frozen=True)
class Fixed:
    value: Any  # the value the code now always uses (None: derived, see ``why``)
    where: str  # the module that holds it
    why: str
    methods: tuple[str, ...] = ()  # the methods that read it (empty: all)
    # Values a run dir or checkpoint written before the removal may hold: they load (a
    # resolved config, not a person's), since the key's old default now means the rule.
    legacy: tuple[Any, ...] = ()


SELA = ("sela",)
# Sections that say how a run is run, not what it computes: an older run dir that set one of
# their removed keys to another value still resumes.
HOW_RUN = ("trainer", "checkpoint", "ray", "wandb")

FIXED: dict[str, Fixed] = {
    "model.blocks": Fixed(1, "selfclust/models/selflabel.py", "small_resnet has one "
                          "BasicBlock per stage; deeper CPU nets use model.widths"),
    "method.heads": Fixed(1, "selfclust/config/methods.py", "DEC, DEPICT and DGG have one "
                          "clustering layer; several heads are SeLa's",
                          ("dec", "depict", "dgg")),
    "method.pixels": Fixed("unit", "selfclust/config/methods.py", "DGG's Bernoulli decoder "
                           "needs pixels in [0, 1]", ("dgg",)),
    "method.sinkhorn_tol": Fixed(1e-3, "selfclust/methods/sela.py", "a relative error of "
                                 "1e-3 in the cluster shares; float32 iterations stall near "
                                 "1e-6", SELA),
    "method.sinkhorn_max_iters": Fixed(1000, "selfclust/methods/sela.py", "a cap only: at "
                                       "λ = 25 the solver converges in far fewer", SELA),
    "method.kmeans_pixel_size": Fixed(16, "selfclust/methods/sela.py", "thumbnails are "
                                      "min(16, image side) pixels a side (derived)", SELA),
    "method.kmeans_iters": Fixed(25, "selfclust/labels/kmeans.py", "25 Lloyd iterations, as "
                                 "faiss and SeLa's k-means initialisation"),
    "method.kmeans_seeding": Fixed("random", "selfclust/labels/kmeans.py", "random starting "
                                   "points: after 25 iterations AFK-MC² ends at the same "
                                   "objective (1.0047 vs 1.0045 of sklearn's at K = 1000) in "
                                   "more time; docs/performance.md"),
    "method.kmeans_tol": Fixed(0.0, "selfclust/labels/kmeans.py", "no early stop: at small K "
                               "the objective stalls for an iteration and falls again (digits, "
                               "K = 10: a tolerance of 1e-3 stopped 0.05-3.3 % above the "
                               "100-iteration objective); docs/performance.md"),
    "method.kmeans_init_heads": Fixed(False, "selfclust/methods/sela.py", "the heads start "
                                      "random; the first labels are the k-means labels "
                                      "either way", SELA),
    "method.manifold_dim": Fixed(10, "selfclust/labels/manifold.py", "UMAP to 10 dimensions "
                                 "for the Gaussian mixture"),
    "method.manifold_restarts": Fixed(3, "selfclust/labels/manifold.py", "3 EM runs per "
                                      "Gaussian mixture; the most likely is kept"),
    "method.manifold_init_select": Fixed("silhouette", "selfclust/labels/manifold.py", "the "
                                         "first partition with the highest cosine silhouette "
                                         "is kept; docs/methods.md"),
    "method.target": Fixed("snapshot", "selfclust/methods/runner.py", "targets from the "
                           "network as of the last refresh, as the papers", ("dec", "depict")),
    "method.alpha": Fixed(1.0, "selfclust/methods/dec.py", "DEC's Student-t with one degree "
                          "of freedom, as the paper", ("dec",)),
    "method.target_power": Fixed(2.0, "selfclust/methods/depict.py", "DEPICT's target p² / "
                                 "Σp (the authors' code; eq. 7's power 1 drifts to soft "
                                 "predictions, docs/methods.md)", ("depict",)),
    "method.recon_hidden_weight": Fixed(0.1, "selfclust/methods/depict.py", "the authors' "
                                        "weight of the hidden-layer reconstruction terms",
                                        ("depict",)),
    "method.sigma_rank": Fixed(None, "selfclust/methods/graph.py", "DGG's σ_i is the distance "
                               "to the k-th neighbour (method.knn_k)", ("dgg",)),
    "data.loader_workers": Fixed(-1, "selfclust/train/batches.py", "derived: "
                                 "trainer.cpus_per_worker - 1 DataLoader processes per rank "
                                 "(the CPUs Ray reserves for the worker, less the training "
                                 "process); raise trainer.cpus_per_worker for more",
                                 legacy=(0,)),
    "optim.momentum": Fixed(0.9, "selfclust/train/optim.py", "SGD momentum 0.9, as SeLa and "
                            "every shipped SGD recipe"),
    "ray.num_cpus": Fixed(None, "selfclust/launch.py", "derived: a local cluster gets the "
                          "machine's CPUs, or the workers' total if more; to cap it, start "
                          "one with `ray start --head --num-cpus N` and set ray.address"),
    "wandb.entity": Fixed(None, "selfclust/runlog.py", "wandb reads the team or user from "
                          "the WANDB_ENTITY environment variable (default: the API key's)"),
    "optim.nesterov": Fixed(False, "selfclust/train/optim.py", "SGD with plain momentum, as "
                            "SeLa"),
    "optim.gamma": Fixed(0.1, "selfclust/train/schedule.py", "the step schedule divides the "
                         "learning rate by 10 at each milestone, as SeLa"),
    "trainer.preemption_check_every": Fixed(10, "selfclust/train/preemption.py", "a barrier "
                                            "over the ranks every 10 steps, well inside a "
                                            "spot notice's 30-120 s"),
    "trainer.channels_last": Fixed(True, "selfclust/train/step.py", "channels_last on CUDA "
                                   "(faster bf16 convolutions; ignored on CPU)"),
    "checkpoint.after_relabel": Fixed(True, "selfclust/train/loop.py", "a checkpoint after "
                                      "each label update, so that a restart never redoes a "
                                      "full label pass"),
}  # fmt: skip


def reads(entry: Fixed, method: str) -> bool:
    """Whether ``method`` read the key when it was one."""
    return not entry.methods or method in entry.methods


def not_a_key(key: str, method: str) -> str:
    """``method.name=dgg has no method.pixels`` or ``optim.gamma is no longer a config key``."""
    section, name = key.split(".", 1)
    if section == "method" and key_owners(name):  # still a key of other methods
        return f"method.name={method} has no {key}"
    return f"{key} is no longer a config key"


def fixed_error(key: str, value: Any, entry: Fixed, method: str) -> str:
    shown = "derived" if key == "method.kmeans_pixel_size" else f"fixed at {entry.value!r}"
    return (
        f"{key}={value!r}: {not_a_key(key, method)}: it is {shown} in {entry.where} "
        f"({entry.why}); delete it"
    )


# Keys merged into one: the new key and the old keys it replaced.
MERGED = {"augment.jitter": ("augment.brightness", "augment.contrast", "augment.saturation")}
# The old keys' default was augment.jitter's.
_JITTER_DEFAULT = AugmentConfig.model_fields["jitter"].default


def merge_keys(tree: dict[str, Any], strict: bool) -> str | None:
    """Replace merged keys in ``tree`` (in place); return an error, or None.

    A person's config (``strict``) whose old keys agree (with each other, an unset one at
    its default, and with the new key if it is set) loads with a :class:`RemovedKeyWarning`;
    disagreeing ones are an error naming the new key. A resolved config (an older run dir)
    takes the first old key: every shipped recipe's brightness was its contrast, and
    saturation acts on colour images only.
    """
    for new, olds in MERGED.items():
        section, new_key = new.split(".")
        keys = tree.get(section)
        if not isinstance(keys, dict):
            continue
        given = {old: keys.pop(old.split(".")[1]) for old in olds if old.split(".")[1] in keys}
        if not given:
            continue
        first = next(iter(given.values()))
        if not strict:
            keys.setdefault(new_key, first)
            continue
        values = [given.get(old, _JITTER_DEFAULT) for old in olds]  # an unset one: its default
        target = keys.get(new_key, values[0])
        if any(v != target for v in values):
            shown = ", ".join(f"{k}={v!r}" for k, v in given.items())
            return (f"{shown}: these are one key now, {new}, the strength of brightness, "
                    f"contrast and saturation together (saturation acts on colour images "
                    f"only); set {new} instead")  # fmt: skip
        warnings.warn(f"{', '.join(given)}: now one key, {new}: replace them by "
                      f"{new}: {target!r}", RemovedKeyWarning, stacklevel=4)  # fmt: skip
        keys[new_key] = target
    return None
