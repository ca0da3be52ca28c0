"""The one recipe (recipe: auto): rules from the data, keys the config sets kept, the
recipe's limits as errors naming the key, and the facts read from real shards."""

import pytest
import torch

from selfclust.config import ConfigError, load_config
from selfclust.recipe import DataFacts, apply_recipe, crop_low, rules, with_recipe

MNIST = DataFacts(num_samples=10_000, side=28, channels=1, clusters=10, mid_tones=0.09)
FACES = DataFacts(num_samples=400, side=32, channels=1, clusters=40, mid_tones=0.89)
PHOTOS = DataFacts(num_samples=1_281_167, side=None, channels=3, clusters=3000)


def test_rules_follow_the_data():
    grey, photos = rules(MNIST), rules(PHOTOS)
    assert grey["optim"]["epochs"] == 30  # 300k images seen
    assert rules(DataFacts(400, 32, 1, 40))["optim"]["epochs"] == 750
    assert photos["optim"]["epochs"] == 24
    faces = rules(FACES)["augment"]
    assert grey["augment"]["hflip"] == 0 and grey["augment"]["rotation"] == 25  # strokes
    assert faces["hflip"] == photos["augment"]["hflip"] == 0.5 and faces["rotation"] == 0
    assert grey["augment"]["grayscale"] == faces["grayscale"] == 0  # one channel
    assert photos["augment"]["grayscale"] > 0
    assert crop_low(28) == pytest.approx(0.327) and crop_low(224) == 0.08
    assert crop_low(16) == 0.5
    assert grey["model"]["arch"] == "small_resnet" and photos["model"]["arch"] == "resnet18"
    assert photos["data"]["image_size"] == 224 and photos["augment"]["where"] == "loader"
    assert grey["method"]["kmeans_samples"] == 10_000  # every image up to 100k
    assert photos["method"]["kmeans_samples"] == 300_000  # 100 K: a fixed sample
    assert grey["optim"]["batch_size"] == 128 and rules(MNIST, 3)["optim"]["batch_size"] == 126


def test_keys_the_config_sets_are_kept():
    cfg = load_config(None, ["recipe=auto", "method.clusters=10", "augment.hflip=0.25",
                             "optim.epochs=3"])  # fmt: skip
    out, filled = apply_recipe(cfg, MNIST)
    assert out.augment.hflip == 0.25 and out.optim.epochs == 3
    assert "augment.hflip" not in filled and "optim.epochs" not in filled
    assert tuple(out.augment.crop_scale) == (pytest.approx(0.327), 1.0)
    assert out.method.final_refine and out.method.relabel_heads == "keep"
    assert filled["method.heads"] == 1
    same, nothing = apply_recipe(load_config(None, ["method.clusters=10"]), MNIST)
    assert nothing == {} and same.optim.epochs == 400  # recipe: none, the defaults


@pytest.mark.parametrize(
    ("overrides", "facts", "message"),
    [
        (["recipe=auto"], MNIST, "method.clusters=K"),
        (
            ["recipe=auto", "method.clusters=3000"],
            DataFacts(10_000, 28, 1, 3000),
            "lower method.clusters to at most 2000",
        ),
        (["recipe=auto", "method.name=dec", "method.clusters=10"], MNIST, "remove recipe"),
    ],
)
def test_the_recipes_limits_name_the_key(overrides, facts, message):
    with pytest.raises(ConfigError, match=message):
        apply_recipe(load_config(None, overrides), facts)


def test_facts_from_real_shards(digits_npz, tmp_path, capsys):
    from selfclust.shards.write import write_shards

    write_shards(str(digits_npz), tmp_path / "digits")
    cfg = load_config(None, ["recipe=auto", "method.clusters=10",
                             f"data.train={tmp_path / 'digits'}"])  # fmt: skip
    out = with_recipe(cfg)
    assert out.optim.epochs == 167  # ceil(300000 / 1797)
    assert tuple(out.augment.crop_scale) == (0.5, 1.0)  # 8 px: the largest smallest crop
    assert out.augment.hflip == 0  # digits: strokes (35 % mid-tones on sklearn's 8 x 8)
    line = capsys.readouterr().out
    assert "recipe: 1797 images, 8px, 1 channel(s), 3" in line and "(strokes), K=10" in line


def test_mid_tones_tell_strokes_from_photographs():
    from selfclust.recipe import STROKES_BELOW, mid_tones
    from tests.helpers.data import digits

    x, _ = digits()  # 8 x 8 digits, values 0..16
    strokes = torch.as_tensor(x).reshape(-1, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 255, 32).view(1, 1, 1, 32).expand(64, 3, 32, 32)
    photos = (ramp + 40 * torch.rand(64, 3, 32, 32, generator=g)).clamp(0, 255).to(torch.uint8)
    assert mid_tones(strokes) < STROKES_BELOW < mid_tones(photos)


def test_images_too_small_for_the_network():
    cfg = load_config(None, ["recipe=auto", "method.clusters=2"])
    with pytest.raises(ConfigError, match="data.image_size=8"):
        apply_recipe(cfg, DataFacts(500, 20, 1, 2, short_side=1))
