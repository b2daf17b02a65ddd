"""dtl.train.optimisation.lr: the schedule, warm-up and linear scaling."""

import pytest

from dtl.config import Config
from dtl.train.optimisation.lr import lr_at


def test_lr_schedule_and_linear_scaling():
    cfg = Config(lr=0.1, lr_scale="linear", grad_accum=2, warmup_epochs=1, lr_schedule="cosine", epochs=3).optim
    assert lr_at(cfg, 0, steps_per_epoch=10, world_size=4) == pytest.approx(0.8 / 10)  # warm-up, scaled x8
    assert lr_at(cfg, 10, 10, 4) == pytest.approx(0.8)  # cosine starts at the scaled rate
    assert lr_at(cfg, 29, 10, 4) < 0.01
    assert lr_at(Config(lr=0.1).optim, 5, 10, 4) == 0.1  # --lr-scale none: as given
