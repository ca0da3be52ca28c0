"""The config schema as users read it: descriptions, which method reads which key, the
generated reference (docs/config.md, `selfclust config`), and keys of another method."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from selfclust.cli import main
from selfclust.config import (
    BY_NAME,
    FIXED,
    METHODS,
    ConfigError,
    RemovedKeyWarning,
    RunConfig,
    key_owners,
    load_config,
    method_defaults,
    method_keys,
)
from selfclust.config.doc import REGENERATE, all_fields, render, sections

ROOT = Path(__file__).parents[1]


def _keys(method: str | None) -> set[str]:
    return {k.name for s in sections(method) for k in s.keys}


def test_docs_config_md_is_generated_from_the_schema() -> None:
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == render("markdown"), f"docs/config.md is stale: run `{REGENERATE}`"


def test_every_key_and_section_has_a_description() -> None:
    fields = list(all_fields())
    assert len([n for n, _ in fields if "." in n or n in ("seed", "recipe")]) == 73
    missing = [name for name, f in fields if not (f.description or "").strip()]
    assert not missing, missing


def test_each_method_has_its_own_section() -> None:
    """method.name picks the model; a key is a key of the methods whose models define it, and
    at most ~50 keys reach a user of any method (SeLa 57, DEC and DGG 45, DEPICT 56: see
    docs/config.md)."""
    for name in METHODS:
        assert BY_NAME[name]().name == name
        keys = method_keys(name)
        assert keys[0] == "name" and all(name in key_owners(k) for k in keys)
        assert len(_keys(name)) <= 57, name
    assert key_owners("lam") == ("sela",) and key_owners("hidden") == ("dec", "dgg")
    assert key_owners("clusters") == METHODS
    for dotted, entry in FIXED.items():  # a fixed key is no key of the methods it is fixed for
        section, key = dotted.split(".", 1)
        readers = entry.methods or METHODS
        assert section != "method" or not set(readers) & set(key_owners(key)), dotted


def test_method_filter() -> None:
    every = _keys(None)
    sela, dec, depict, dgg = (_keys(m) for m in METHODS)
    assert "method.lam" in sela and "method.stop_tol" not in sela  # stop_tol: DEC's stop rule
    assert "method.stop_tol" in dec and "method.lam" not in dec
    assert not any(k.startswith("model.") for k in dec | depict | dgg)  # SeLa's ResNet only
    assert "augment.crop_scale" in depict and "augment.crop_scale" not in dgg
    assert "method.knn_k" in dgg and "method.knn_k" not in depict
    assert sela | dec | depict | dgg == every
    for key in ("seed", "data.train", "method.name", "method.clusters", "optim.lr", "wandb.mode"):
        assert all(key in s for s in (sela, dec, depict, dgg)), key


def test_cli_prints_every_key(capsys) -> None:
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    missing = [k for k in _keys(None) if f"\n  {k}: " not in text]
    assert not missing, missing
    assert main(["config", "--method", "sela"]) == 0
    text = capsys.readouterr().out
    assert "method.lam:" in text and "method.stop_tol" not in text
    assert main(["config", "--format", "markdown"]) == 0
    assert capsys.readouterr().out == render("markdown")


def test_cli_rejects_an_unknown_method(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["config", "--method", "kmeans"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="--format"):
        render("html")


@pytest.mark.parametrize("method", [None, *METHODS])
def test_yaml_loads_back_to_the_defaults(method: str | None, tmp_path: Path) -> None:
    text = render("yaml", method)
    path = tmp_path / "defaults.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.to_dict() == method_defaults(method or "sela").to_dict()
    written = yaml.safe_load(text)
    assert {f"{s}.{k}" for s, v in written.items() if isinstance(v, dict) for k in v} | {
        k for k, v in written.items() if not isinstance(v, dict)
    } == _keys(method or "sela")
    if method is None:
        assert cfg.to_dict() == load_config(None).to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["method.stop_tol=0.5"],
            "method.stop_tol is a key of dec (method.name=sela): remove it or set method.name=dec",
        ),
        (
            ["method.name=dec", "method.lam=10"],
            "method.lam is a key of sela (method.name=dec): remove it or set method.name=sela",
        ),
        (
            ["method.name=dgg", "method.conv_channels=[8]"],
            "method.conv_channels is a key of depict (method.name=dgg)",
        ),
        (
            ["method.pretrain_dropout=0.5"],
            "method.pretrain_dropout is a key of dec and depict (method.name=sela): remove it "
            "or set method.name=dec or method.name=depict",
        ),
        (
            ["method.name=depict", "method.init=kmeans"],
            "method.init is a key of sela (method.name=depict)",
        ),
    ],
)
def test_keys_of_another_method_are_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value), str(e.value)


def test_keys_of_another_method_at_their_default_and_resolved_configs(tmp_path: Path) -> None:
    """A resolved config of an older selfclust (RUN_DIR/config.yaml, a checkpoint's) holds
    every method's keys: at their defaults the other methods' keys pass even as a config a
    person wrote; read back with model_validate they are dropped whatever their value, since
    they were never read (a run made before the check may hold one)."""
    for method in METHODS:
        dumped = tmp_path / f"{method}.yaml"
        dumped.write_text(yaml.safe_dump(method_defaults(method).to_dict()))
        assert load_config(dumped).to_dict() == method_defaults(method).to_dict()
        old = method_defaults(method).to_dict()
        for other in METHODS:  # every key of every method, as one flat section held them
            old["method"] = {**method_defaults(other).to_dict()["method"], **old["method"]}
        if method != "sela":
            old["method"]["heads"] = 1  # required then
        dumped.write_text(yaml.safe_dump(old))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RemovedKeyWarning)  # method.heads, dgg's pixels
            assert load_config(dumped).to_dict() == method_defaults(method).to_dict()
        assert RunConfig.model_validate(old).to_dict() == method_defaults(method).to_dict()
    old = method_defaults("sela").to_dict()
    old["method"]["stop_tol"] = 0.5
    assert RunConfig.model_validate(old).to_dict() == method_defaults("sela").to_dict()


def test_shipped_configs_set_only_their_methods_keys() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no key that is now fixed in the code
            cfg = load_config(path)
        written = yaml.safe_load(path.read_text())
        foreign = set(written.get("method", {})) - set(method_keys(cfg.method.name))
        assert not foreign, (path.name, foreign)
        if cfg.method.name != "sela":
            assert "model" not in written, path.name
