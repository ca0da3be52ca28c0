"""SeLa's one recipe (``recipe: auto``, configs/sela.yaml): what depends on the data is derived
from the data.

The driver reads the shard manifest (N images, their side and channels) and, with K from
``method.clusters``, fills in every key below that the config does not set; a key the config or
the command line sets is kept as given. The rules (docs/recipe.md gives the reasons):

* **training length**: at least 24 epochs and at least 300,000 images seen
  (``optim.epochs = max(24, ceil(300000 / N))``): small sets need many passes, large ones few;
* **crops**: the smallest random-resized crop still holds a 16 × 16 patch of the image
  (``crop_scale = [clip((16 / side)², 0.08, 0.5), 1]``: 0.08 at 224 px as in SimCLR/SeLa);
* **strokes or photographs**: images whose pixels are mostly at their own extremes (fewer than
  40 % mid-tones, over a fixed sample of 1,000: digits, characters, line drawings) get no
  flips and rotations up to ±25°; the others (photographs, grey or colour) get flips and no
  rotation. Colour images also get random grayscale; brightness/contrast jitter for all;
* **network**: the narrow small_resnet up to 64 px; ResNet-18 with ImageNet's stem above;
  images of mixed sizes are cropped to 224 px in the loader;
* **samples**: k-means clusters every image up to 100,000, above that ``max(100000, 100 K)``
  sampled ones (a fixed size, whatever N);
* **labels**: one head; first labels by k-means on pixel thumbnails; 12 evenly spaced
  Sinkhorn label updates after the first 12 % of training; after the last step the head is
  re-set to the spherical k-means centres of the features refined from its own predictions
  (``method.final_refine``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from selfclust.config import ConfigError, RunConfig, SelaMethod
from selfclust.data.shardset import ShardSet

# Fewest images per cluster the recipe serves (ORL: 10 per person). Below it, equal-size
# clusters are mostly noise.
MIN_PER_CLUSTER = 5
MIN_EPOCHS = 24
BATCH = 128  # global batch, rounded down to a multiple of trainer.num_workers
MIN_IMAGES_SEEN = 300_000
PATCH = 16  # pixels: the side of the smallest crop
ALL_SAMPLES_UP_TO = 100_000
SAMPLES_PER_CLUSTER = 100
SMALL_SIDE = 64  # up to here: small_resnet on the shards' own size
MIXED_SIDE = 224
MIN_SIDE = 8  # sklearn's 8 x 8 digits train; fewer pixels are not images to this network
# Below this fraction of mid-tone pixels, images are strokes on a background. Measured (1,000
# images each): MNIST 0.09, USPS 0.20, sklearn's 8 x 8 digits 0.35; COIL-20 objects on black
# 0.50, ORL faces 0.89, CIFAR-10 0.86.
STROKES_BELOW = 0.4
TONE_SAMPLE = 1000


@dataclass(frozen=True)
class DataFacts:
    """What the recipe reads from the shard manifest, and K."""

    num_samples: int
    side: int | None  # the longer side when every image has one size; None when mixed
    channels: int
    clusters: int
    short_side: int | None = None  # the shorter side (same-size images)
    mid_tones: float = 1.0  # fraction of pixels between 10 % and 90 % of their image's range


def crop_low(side: int) -> float:
    """The smallest crop's area fraction: a 16 × 16 patch, between 0.08 and 0.5."""
    return round(min(0.5, max(0.08, (PATCH / side) ** 2)), 3)


def rules(f: DataFacts, workers: int = 1) -> dict[str, dict[str, Any]]:
    """The recipe's values for these data on ``workers`` ranks: ``{section: {key: value}}``."""
    side = f.side or MIXED_SIDE
    colour = f.channels == 3
    strokes = f.mid_tones < STROKES_BELOW
    if f.side is not None and f.side <= SMALL_SIDE:
        model: dict[str, Any] = {"arch": "small_resnet", "widths": [16, 32, 64]}
    else:
        model = {"arch": "resnet18", "small_stem": False}
    data: dict[str, Any] = {} if f.side is not None else {"image_size": MIXED_SIDE}
    augment: dict[str, Any] = {
        "crop_scale": [crop_low(side), 1.0],
        "hflip": 0.0 if strokes else 0.5,
        "grayscale": 0.2 if colour else 0.0,
        "rotation": 25.0 if strokes else 0.0,
        "jitter": 0.4,
    }
    if f.side is None:
        augment["where"] = "loader"
    samples = f.num_samples
    if samples > ALL_SAMPLES_UP_TO:
        samples = max(ALL_SAMPLES_UP_TO, SAMPLES_PER_CLUSTER * f.clusters)
    method = {
        "heads": 1,
        "init": "kmeans_pixels",
        "final_refine": True,
        "relabels": 12,
        "relabel_power": 1.0,
        "relabel_start": 0.12,
        "kmeans_samples": samples,
    }
    epochs = max(MIN_EPOCHS, math.ceil(MIN_IMAGES_SEEN / f.num_samples))
    batch = max(workers, BATCH // workers * workers)  # split evenly over the ranks
    optim = {"epochs": epochs, "batch_size": batch, "lr": 0.05, "weight_decay": 1e-4,
             "schedule": "cosine"}  # fmt: skip
    return {"data": data, "model": model, "augment": augment, "method": method, "optim": optim}


def mid_tones(images: torch.Tensor) -> float:
    """Fraction of pixels between 10 % and 90 % of their own image's range (uint8 images
    ``[B, C, H, W]``, channels averaged): low for strokes on a background, high for photos."""
    x = images.float().mean(1).flatten(1)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    z = (x - lo) / (hi - lo).clamp_min(1.0)
    return float(((z > 0.1) & (z < 0.9)).float().mean())


def sample_tones(shards: ShardSet, size: int | None) -> float:
    """:func:`mid_tones` of the first 1,000 images of the shards (a fixed sample: one read)."""
    from selfclust.data.streams import eval_batches

    seen: list[torch.Tensor] = []
    for images, _, _ in eval_batches(shards, 0, 1, 250, image_size=size):
        seen.append(images)
        if sum(len(b) for b in seen) >= TONE_SAMPLE:
            break
    return mid_tones(torch.cat(seen)[:TONE_SAMPLE])


def check_facts(f: DataFacts, cfg: RunConfig) -> None:
    """The recipe's limits, as errors that name the key to change."""
    if f.short_side is not None and f.short_side < MIN_SIDE:
        raise ConfigError(
            f"the images in {cfg.data.train} are {f.short_side} px on their shorter side; the "
            f"recipe's network needs at least {MIN_SIDE} px (it halves the resolution twice): "
            f"set data.image_size={MIN_SIDE} or more to resize them, or shard images, not "
            "vectors laid out as one-pixel rows"
        )
    if f.clusters * MIN_PER_CLUSTER > f.num_samples:
        raise ConfigError(
            f"method.clusters={f.clusters} asks for clusters of {f.num_samples / f.clusters:.1f} "
            f"images on average ({f.num_samples} in {cfg.data.train}); the recipe needs at "
            f"least {MIN_PER_CLUSTER} per cluster: lower method.clusters to at most "
            f"{f.num_samples // MIN_PER_CLUSTER} or add images"
        )


def apply_recipe(cfg: RunConfig, facts: DataFacts) -> tuple[RunConfig, dict[str, Any]]:
    """``cfg`` with the recipe's value for every key it does not set, and those values
    (dotted keys). A config without ``recipe: auto`` is returned as it is."""
    if cfg.recipe != "auto":
        return cfg, {}
    if not isinstance(cfg.method, SelaMethod):
        raise ConfigError(
            f"recipe: auto is SeLa's recipe; method.name={cfg.method.name} takes its keys from "
            "the config: remove recipe"
        )
    if "clusters" not in cfg.method.model_fields_set:
        raise ConfigError(
            "recipe: auto needs the number of clusters: set method.clusters=K (e.g. the number "
            "of classes you expect)"
        )
    check_facts(facts, cfg)
    tree, filled = cfg.to_dict(), {}
    for section, values in rules(facts, max(1, cfg.trainer.num_workers)).items():
        given = getattr(cfg, section).model_fields_set
        for key, value in values.items():
            if key not in given:
                tree[section][key] = value
                filled[f"{section}.{key}"] = value
    return RunConfig.model_validate(tree), filled


def describe(facts: DataFacts, filled: dict[str, Any]) -> str:
    """One line for the console: the data and what the recipe chose."""
    side = f"{facts.side}px" if facts.side else "mixed sizes"
    kind = "strokes" if facts.mid_tones < STROKES_BELOW else "photographs"
    chosen = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in filled.items())
    return (
        f"recipe: {facts.num_samples} images, {side}, {facts.channels} channel(s), "
        f"{facts.mid_tones:.0%} mid-tones ({kind}), K={facts.clusters} -> {chosen}"
    )


def with_recipe(cfg: RunConfig, shards: ShardSet | None = None) -> RunConfig:
    """The driver's step (after :func:`~selfclust.data.preflight.check_sets`, which names a
    missing or cut shard before the sample below reads one): read the training shards'
    manifest (``shards``, where the caller has opened it) and apply the recipe, printing what
    it chose."""
    if cfg.recipe != "auto":
        return cfg
    if shards is None:
        shards = ShardSet.open(cfg.data.train, cfg.data.io_timeout_s)
    image = shards.image
    sides = sorted((int(image["height"]), int(image["width"]))) if image else [None, None]
    if cfg.data.image_size is not None:  # resized to a square of this side
        sides = [cfg.data.image_size] * 2
    tones = sample_tones(shards, cfg.data.image_size or (None if image else MIXED_SIDE))
    facts = DataFacts(shards.num_samples, sides[1], shards.channels, cfg.method.clusters,
                      short_side=sides[0], mid_tones=tones)  # fmt: skip
    cfg, filled = apply_recipe(cfg, facts)
    print(f"[selfclust] {describe(facts, filled)}", flush=True)
    return cfg
