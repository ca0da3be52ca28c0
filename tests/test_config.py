from pathlib import Path

import pytest

from selfclust.config import ConfigError, load_config, parse_overrides


def test_defaults_are_selas(tmp_path):
    cfg = load_config(None)
    assert cfg.method.lam == 25.0
    assert cfg.method.heads == 10
    assert cfg.method.clusters == 3000
    assert cfg.optim.lr == 0.05


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.1\nmodel:\n  arch: small_resnet\n")
    cfg = load_config(p, ["optim.lr=0.2", "model.widths=[8,16]", "trainer.num_workers=4"])
    assert cfg.optim.lr == 0.2
    assert cfg.model.arch == "small_resnet"
    assert cfg.model.widths == [8, 16]
    assert cfg.trainer.num_workers == 4


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lrr=0.1"])
    msg = str(e.value)
    assert "optim.lrr" in msg and "unknown key" in msg and "lr" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="optimiser"):
        load_config(None, ["optimiser.lr=0.1"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=-1", "optim.lr"),
        ("method.lam=0", "method.lam"),
        ("model.arch=vgg", "model.arch"),
        ("wandb.mode=loud", "wandb.mode"),
        ("augment.crop_scale=[0.9,0.1]", "augment"),
        ("method.clusters=1", "method.clusters"),
        ("optim.epochs=abc", "optim.epochs"),
        ("method.kmeans_seeding=kmeans||", "method.kmeans_seeding"),
        ("method.kmeans_tol=1", "method.kmeans_tol"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_batch_must_split_over_workers():
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, ["optim.batch_size=255", "trainer.num_workers=2"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for c in configs:
        load_config(c)


def test_checkpoint_compatibility_tolerates_new_keys_with_defaults() -> None:
    from selfclust.checkpoint import IncompatibleCheckpoint, check_compatible
    from selfclust.config import load_config

    cfg = load_config(None, [])
    old = cfg.to_dict()
    del old["method"]["kmeans_samples"]  # written by a selfclust that had no such key
    check_compatible(old, cfg, "old checkpoint")  # the default fills it: compatible
    changed = load_config(None, ["method.kmeans_samples=3"])
    with pytest.raises(IncompatibleCheckpoint, match="method.kmeans_samples"):
        check_compatible(old, changed, "old checkpoint")


MANIFOLD = ["method.cluster_init=manifold"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["method.name=dec", "method.heads=10"], ["method.name=dec has no method.heads", "1"]),
        (["method.name=dgg", "method.pixels=standardized"], ["[0, 1]"]),
        (["method.name=depict", "method.conv_kernels=[4]"], ["conv_kernels"]),
        (["method.name=kmeans"], ["method.name"]),
        (["method.name=dgg", "method.sigma_rank=11"], ["sigma_rank"]),
        (["method.manifold_init_candidates=4"], ["init=manifold_pixels", "init=random"]),
        (
            ["method.name=dec", "method.manifold_init_candidates=4"],
            ["cluster_init=kmeans", "method.cluster_init=manifold"],
        ),
        (["method.cluster_init=manifold"], ["dec, depict and dgg", "method.init"]),
        (
            [
                "method.init=manifold_pixels",
                "method.clusters=10",
                "method.manifold_init_candidates=2",
                "method.manifold_init_select=consensus",
            ],
            ["method.manifold_init_select", "silhouette"],
        ),
        (["method.name=dec", "method.clusters=2000", *MANIFOLD], ["1000"]),
        (
            [
                "method.name=dgg",
                "method.relabels=3",
                "method.clusters=10",
                "method.manifold_relabels=1",
            ],
            ["sela and depict", "remove it"],
        ),
        (
            [
                "method.name=depict",
                "method.clusters=10",
                "method.init=manifold_pixels",
            ],
            ["a key of sela", "method.cluster_init"],
        ),  # fmt: skip
        (
            ["method.name=dec", "method.noise_augment=true"],
            ["method.noise_augment is a key of depict", "remove it"],
        ),
        (
            ["method.name=depict", "augment.where=loader"],
            ["method.name=depict", "augment.where=device"],
        ),
    ],
)
def test_method_configs_are_validated(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_method_configs_load():
    from pathlib import Path

    root = Path(__file__).parents[1] / "configs"
    for method in ("sela", "dec", "depict", "dgg"):
        for data in ("mnist_test", "usps"):
            cfg = load_config(root / f"{method}_{data}.yaml")
            assert cfg.method.name == method and cfg.method.heads == 1
    assert load_config(root / "sela_coil20.yaml").method.clusters == 20


def test_relative_local_shard_paths_become_absolute(tmp_path: Path, monkeypatch) -> None:
    """Ray workers run in another directory: a relative `data.train` must reach them absolute;
    URLs and pipe: commands pass through unchanged."""
    from selfclust.data.preflight import resolve_data

    quickstart = Path(__file__).parents[1] / "configs" / "quickstart.yaml"

    monkeypatch.chdir(tmp_path)
    cfg = load_config(quickstart, ["data.train=shards/usps", "data.eval=x/{0..3}"])
    out = resolve_data(cfg, tmp_path / "run")
    assert out.data.train == str(tmp_path / "shards" / "usps")
    assert out.data.eval == str(tmp_path / "x" / "{0..3}")
    for spec in ("http://127.0.0.1:8000/digits", "pipe:cat /data/{name}", "/abs/shards"):
        cfg = load_config(quickstart, [f"data.train={spec}"])
        assert resolve_data(cfg, tmp_path / "run").data.train == spec


def test_malformed_yaml_names_the_file_and_line(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  epochs: [1, 2\nseed: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML: line 4, column 5"):
        load_config(bad)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="binary.yaml cannot be read"):
        load_config(binary)
    with pytest.raises(ConfigError, match=r"override 'optim.lr=\[1,': its value is not valid"):
        load_config(None, ["optim.lr=[1,"])
