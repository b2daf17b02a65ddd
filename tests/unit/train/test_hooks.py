"""dtl.train.hooks: the end-of-epoch hooks a run's settings call for, and what each decides."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dtl.config import Config
from dtl.train import hooks
from dtl.train.hooks import EpochEnd
from dtl.train.train_state import TrainState


def parts_for(**settings: object) -> SimpleNamespace:
    return SimpleNamespace(cfg=Config(mode="scratch", **settings))


def test_the_settings_choose_the_hooks_in_order():
    assert hooks.hooks_for(Config(mode="scratch")) == (hooks.choose_best, hooks.log_row)
    every = Config(mode="scratch", ema_decay=0.99, early_stop_patience=2)
    assert hooks.hooks_for(every) == (hooks.evaluate_ema, hooks.choose_best, hooks.early_stopping, hooks.log_row)


@pytest.mark.parametrize("best_of, expected", [("raw", ("raw", 0.5)), ("ema", ("ema", 0.6)), ("both", ("ema", 0.6))])
def test_choose_best_among_the_weights_best_of_names(best_of, expected):
    state = TrainState(best_acc=0.55)
    end = EpochEnd(0, {}, {"raw": 0.5, "ema": 0.6})
    hooks.choose_best(parts_for(best_of=best_of, ema_decay=0.99), state, end)
    assert (end.best_source, state.best_acc) == (expected[0], max(0.55, expected[1]))
    assert end.is_best is (expected[1] > 0.55)


def test_early_stopping_counts_epochs_without_improvement_and_marks_the_best_epoch():
    parts = parts_for(early_stop_patience=2, early_stop_metric="test_loss", early_stop_min_delta=0.01)
    state = TrainState()
    decisions = []
    for epoch, loss in enumerate([1.0, 0.8, 0.795, 0.9]):  # 0.795 is not better by more than 0.01
        end = EpochEnd(epoch, {"test_loss": loss}, {"raw": 0.0}, is_best=True, best_source="ema")
        hooks.early_stopping(parts, state, end)
        decisions.append((end.is_best, end.best_source, state.early_stop_bad_epochs, state.early_stopped))
    assert decisions == [(True, "raw", 0, False), (True, "raw", 0, False), (False, "raw", 1, False),
                         (False, "raw", 2, True)]
    assert (state.early_stop_best, state.early_stop_best_epoch) == (0.8, 2)
