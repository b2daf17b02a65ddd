"""dtl.train.checkpoint.checkpointer: when to save, and a save -> restore round trip of everything a resume needs."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from dtl.distributed import DistEnv
from dtl.errors import UserError
from dtl.train.checkpoint.checkpointer import Checkpointer
from dtl.train.train_state import TrainState

CPU = torch.device("cpu")


def make(tmp_path, env=None, **kw) -> Checkpointer:
    opts = {"every_steps": 0, "every_minutes": 0.0, "keep_last": 2} | kw
    meta = {"config": {"model": "tiny", "mode": "scratch"}, "num_classes": 3, "world_size": 1, "run": {}}
    return Checkpointer(tmp_path, env or DistEnv(), CPU, static_meta=meta, **opts)


def test_when_to_save(tmp_path):
    steps = make(tmp_path, every_steps=5)
    assert steps.due(10, False, last_step=False) and not steps.due(11, False, last_step=False)
    assert not steps.due(10, True, last_step=True)  # the epoch's end saves anyway
    minutes = make(tmp_path, every_minutes=0.001)
    minutes.last_time = time.monotonic() - 1
    assert minutes.time_due() and minutes.due(3, True, last_step=False)
    other_rank = make(tmp_path, env=DistEnv(rank=1, world_size=2), every_minutes=0.001)
    other_rank.last_time = time.monotonic() - 1
    assert not other_rank.time_due()  # only rank 0's clock decides


def test_save_and_restore_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    progress = TrainState(epoch=1, step_in_epoch=2, global_step=7, best_acc=0.5, partial_meter=[1.0, 2.0, 3.0])
    saver = make(tmp_path)
    path = saver.save(model, opt, scaler, progress, is_best=True)
    assert saver.last == path and path.name == "step-00000007"

    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    loader = make(tmp_path)
    restored = loader.restore(path, fresh, fresh_opt, scaler)
    assert restored == progress and loader.last == path
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"],
                       fresh_opt.state_dict()["state"][0]["momentum_buffer"])

    other = make(tmp_path)
    other.static_meta = {**other.static_meta, "num_classes": 5}
    with pytest.raises(UserError, match="3 classes; this run is 'tiny' with 5 classes"):
        other.restore(path, fresh, fresh_opt, scaler)


def test_the_saved_state_keeps_the_checkpoint_format():
    """Checkpoints written before TrainState (as "progress") still resume: the saved keys are the same, and the
    device-side counts are not saved."""
    assert list(TrainState().saved()) == [
        "epoch", "step_in_epoch", "global_step", "best_acc", "nan_skips", "nan_skips_total", "overflow_skips",
        "partial_meter", "partial_seconds", "early_stop_best", "early_stop_best_epoch", "early_stop_bad_epochs",
        "early_stopped", "partial_grad_norms"]
    old = {"epoch": 1, "step_in_epoch": 2, "global_step": 7, "best_acc": 0.5, "nan_skips": 0, "nan_skips_total": 0,
           "overflow_skips": 0, "partial_meter": [1.0, 2.0, 3.0], "partial_seconds": 1.5, "early_stop_best": None,
           "early_stop_best_epoch": 0, "early_stop_bad_epochs": 0, "early_stopped": False,
           "partial_grad_norms": [0.0, 0.0, 0.0]}
    assert TrainState.from_saved(old, torch.device("cpu")).saved() == old
