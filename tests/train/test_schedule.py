import math

from selfclust.config import OptimConfig
from selfclust.train.schedule import lr_at, relabel_steps


def test_relabel_steps_quadratic_and_dense_early():
    steps = relabel_steps(10000, 80, 2.0)
    assert steps == sorted(set(steps))
    assert all(0 < s < 10000 for s in steps)
    # t_j = T (j/R)^2: the j-th update, formula transcribed directly
    assert steps[-1] == int(10000 * (79 / 80) ** 2)
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert gaps[0] < gaps[-1]  # more often early


def test_relabel_steps_start_and_degenerate():
    steps = relabel_steps(1000, 10, 2.0, start=100)
    assert steps[0] == 100 and all(100 <= s < 1000 for s in steps)
    assert relabel_steps(0, 10) == []
    assert relabel_steps(100, 1) == []


def test_lr_step_schedule():
    cfg = OptimConfig(lr=0.1, schedule="step", milestones=[0.5, 0.75])  # ÷ 10 at each
    assert lr_at(0, 100, cfg) == 0.1
    assert math.isclose(lr_at(50, 100, cfg), 0.01)
    assert math.isclose(lr_at(99, 100, cfg), 0.001)


def test_lr_cosine_with_warmup():
    cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10)
    assert math.isclose(lr_at(0, 110, cfg), 0.1)
    assert math.isclose(lr_at(9, 110, cfg), 1.0)
    assert math.isclose(lr_at(10, 110, cfg), 1.0)
    assert math.isclose(lr_at(60, 110, cfg), 0.5)
    assert lr_at(110, 110, cfg) < 1e-12
