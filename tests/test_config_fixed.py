"""Keys that are now constants in the code (selfclust/config/fixed.py): the table says what the
code does, a config that still sets one at its value loads with a warning, any other value is
an error naming the key, and saved configs of older runs keep loading."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from pydantic import ValidationError

from selfclust.config import FIXED, ConfigError, RemovedKeyWarning, RunConfig, load_config
from selfclust.config import method_defaults as defaults


def _default(fn: Any, arg: str) -> Any:
    return inspect.signature(fn).parameters[arg].default


def test_the_table_holds_the_codes_values() -> None:
    from selfclust.labels import kmeans, label_pass, manifold
    from selfclust.methods import dec, depict, graph, sela
    from selfclust.models.selflabel import SmallResNet
    from selfclust.train import optim, preemption, schedule

    code = {
        "model.blocks": _default(SmallResNet, "blocks"),
        "method.heads": defaults("dec").method.heads,
        "method.pixels": defaults("dgg").method.pixels,
        "method.sinkhorn_tol": sela.SINKHORN_TOL,
        "method.sinkhorn_max_iters": sela.SINKHORN_MAX_ITERS,
        "method.kmeans_pixel_size": sela.THUMBNAIL_SIDE,
        "method.kmeans_iters": kmeans.LLOYD_ITERS,
        "method.kmeans_seeding": _default(label_pass.kmeans_labels, "seeding"),
        "method.kmeans_tol": _default(label_pass.kmeans_labels, "tol"),
        "method.kmeans_init_heads": _default(label_pass.kmeans_labels, "init_heads") is not None,
        "method.manifold_dim": _default(manifold.manifold_labels, "dim"),
        "method.manifold_restarts": _default(manifold.manifold_labels, "restarts"),
        "method.manifold_init_select": _default(manifold.manifold_labels, "select"),
        "method.target": "snapshot",  # the runners read the teacher: tests/methods
        "method.alpha": _default(dec.ClusteringLayer, "alpha"),
        "method.target_power": _default(depict.balanced_target, "power"),
        "method.recon_hidden_weight": depict.HIDDEN_RECON_WEIGHT,
        "method.sigma_rank": _default(graph.similarity_weights, "sigma_rank"),
        "data.loader_workers": -1,  # train/batches.py: trainer.cpus_per_worker - 1
        "optim.momentum": optim.SGD_MOMENTUM,
        "ray.num_cpus": None,  # launch.py: the machine's CPUs, or the workers' total if more
        "wandb.entity": None,  # runlog.py: wandb reads WANDB_ENTITY
        "optim.nesterov": False,  # train/optim.py builds SGD without it
        "optim.gamma": schedule.STEP_GAMMA,
        "trainer.preemption_check_every": preemption.CHECK_EVERY,
        "trainer.channels_last": True,  # train/step.py: channels_last on every CUDA run
        "checkpoint.after_relabel": True,  # train/loop.py checkpoints after every label pass
    }
    assert set(code) == set(FIXED)
    for key, value in code.items():
        assert FIXED[key].value == value, key
    assert _default(dec.best_centroids, "niter") == kmeans.LLOYD_ITERS
    assert _default(label_pass.kmeans_labels, "niter") == kmeans.LLOYD_ITERS


def test_thumbnails_are_at_most_16_pixels_and_never_upsampled() -> None:
    import torch

    from selfclust.labels.label_pass import thumbnails

    fn = thumbnails(16)
    assert fn(torch.zeros(2, 1, 28, 28)).shape == (2, 256)
    assert fn(torch.zeros(2, 3, 8, 8)).shape == (2, 192)  # 8 x 8 digits: as they are


@pytest.mark.parametrize(
    "override, method",
    [
        ("method.kmeans_iters=25", "sela"),
        ("method.sinkhorn_tol=0.001", "sela"),
        ("method.alpha=1.0", "dec"),
        ("method.heads=1", "depict"),
        ("method.pixels=unit", "dgg"),
        ("optim.gamma=0.1", "sela"),
        ("checkpoint.after_relabel=true", "dgg"),
        ("optim.momentum=0.9", "dec"),
        ("data.loader_workers=-1", "sela"),
    ],
)
def test_a_fixed_key_at_its_value_loads_with_a_warning(override: str, method: str) -> None:
    with pytest.warns(RemovedKeyWarning, match=override.split("=")[0]):
        cfg = load_config(None, [f"method.name={method}", override])
    assert cfg.to_dict() == defaults(method).to_dict()


@pytest.mark.parametrize(
    "override, method, words",
    [
        ("method.kmeans_iters=3", "sela", ["no longer a config key", "labels/kmeans.py"]),
        ("method.kmeans_pixel_size=8", "sela", ["derived", "min(16, image side)"]),
        ("method.target=current", "dec", ["fixed at 'snapshot'"]),
        ("method.heads=3", "dgg", ["method.name=dgg has no method.heads", "fixed at 1"]),
        ("optim.nesterov=true", "sela", ["optim.nesterov", "fixed at False"]),
        ("trainer.preemption_check_every=0", "dec", ["fixed at 10"]),
        ("data.loader_workers=4", "sela", ["cpus_per_worker - 1"]),
        ("ray.num_cpus=8", "sela", ["ray start --head --num-cpus N", "ray.address"]),
        ("wandb.entity=me", "dgg", ["WANDB_ENTITY"]),
    ],
)
def test_a_fixed_key_at_another_value_is_an_error(
    override: str, method: str, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"method.name={method}", override])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_saved_configs_of_older_runs() -> None:
    """An old checkpoint holds the fixed keys at their then-defaults (= the fixed values):
    it loads. One that ran with another value of a key its method read cannot be resumed as
    it was; one whose method never read the key loads without it."""
    old = defaults("dec").to_dict()
    old["method"].update(heads=1, alpha=1.0, target="snapshot", kmeans_iters=25)
    old["optim"]["gamma"] = 0.1
    assert RunConfig.model_validate(old).to_dict() == defaults("dec").to_dict()
    old["method"]["alpha"] = 2.0
    with pytest.raises(ValidationError, match="method.alpha"):
        RunConfig.model_validate(old)
    sela = defaults("sela").to_dict()
    sela["method"]["alpha"] = 2.0  # a DEC key that SeLa never read
    assert RunConfig.model_validate(sela).to_dict() == defaults("sela").to_dict()

    # Removed keys that only say how a run is run, and the old default of a derived one,
    # load whatever their value: the run computes the same.
    sela["data"]["loader_workers"] = 0
    sela["ray"]["num_cpus"] = 8
    sela["wandb"]["entity"] = "me"
    assert RunConfig.model_validate(sela).to_dict() == defaults("sela").to_dict()
    sela["data"]["loader_workers"] = 3  # another data order than cpus_per_worker - 1 gives
    with pytest.raises(ValidationError, match="data.loader_workers"):
        RunConfig.model_validate(sela)


def test_jitter_is_one_key_for_brightness_contrast_and_saturation() -> None:
    """The three jitter strengths became augment.jitter: agreeing old keys load (with a
    warning), disagreeing ones are an error naming the new key; an older run dir's saved
    config takes its brightness."""
    with pytest.warns(RemovedKeyWarning, match="augment.jitter"):
        cfg = load_config(
            None, [f"augment.{k}=0.3" for k in ("brightness", "contrast", "saturation")]
        )
    assert cfg.augment.jitter == 0.3
    with pytest.raises(ConfigError, match="augment.saturation=0.0.*augment.jitter"):
        load_config(None, ["augment.saturation=0.0"])  # the old grey-digit recipes' line
    with pytest.raises(ConfigError, match="augment.jitter"):
        load_config(None, ["augment.jitter=0.2", "augment.brightness=0.4"])
    old = defaults("sela").to_dict()
    del old["augment"]["jitter"]
    old["augment"].update(brightness=0.4, contrast=0.4, saturation=0.0)
    assert RunConfig.model_validate(old).to_dict() == defaults("sela").to_dict()
