"""dtl.train.checkpoint.checkpointer: when to save, and a save -> restore round trip of everything a resume needs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dtl.distributed import DistEnv, ProcessGroups
from dtl.errors import UserError
from dtl.train.checkpoint import format as ckpt
from dtl.train.checkpoint.checkpointer import Checkpointer
from dtl.train.optimisation.ema import Ema
from dtl.train.train_state import TrainState

CPU = torch.device("cpu")
#: A run folder as an earlier dtl wrote it (commit f4ffb02: checkpoint format version 1, written by
#: `Checkpointer.save` of a Sequential(Linear(4, 8), ReLU, Linear(8, 3)) with SGD momentum and an EMA, mid-epoch),
#: kept byte for byte: checkpoints of earlier runs must keep resuming.
V1_RUN = Path(__file__).parent / "v1_run"


def make(tmp_path, env=None, **kw) -> Checkpointer:
    opts = {"every_steps": 0, "every_minutes": 0.0, "keep_last": 2} | kw
    meta = {"config": {"model": "tiny", "mode": "scratch"}, "num_classes": 3, "world_size": 1, "run": {}}
    return Checkpointer(tmp_path, ProcessGroups(env or DistEnv()), CPU, static_meta=meta, **opts)


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
    """A checkpoint's "progress" holds these keys, whichever dtl wrote it; the device-side counts are not saved."""
    assert list(TrainState().saved()) == [
        "epoch", "step_in_epoch", "global_step", "best_acc", "nan_skips", "nan_skips_total", "overflow_skips",
        "partial_meter", "partial_seconds", "early_stop_best", "early_stop_best_epoch", "early_stop_bad_epochs",
        "early_stopped", "partial_grad_norms"]
    old = {"epoch": 1, "step_in_epoch": 2, "global_step": 7, "best_acc": 0.5, "nan_skips": 0, "nan_skips_total": 0,
           "overflow_skips": 0, "partial_meter": [1.0, 2.0, 3.0], "partial_seconds": 1.5, "early_stop_best": None,
           "early_stop_best_epoch": 0, "early_stop_bad_epochs": 0, "early_stopped": False,
           "partial_grad_norms": [0.0, 0.0, 0.0]}
    assert TrainState.from_saved(old, torch.device("cpu")).saved() == old


def tiny_model() -> tuple[nn.Module, torch.optim.Optimizer, Ema]:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, Ema(model, 0.9)


def test_a_checkpoint_of_an_earlier_dtl_resumes(tmp_path):
    path = ckpt.best_or_last(V1_RUN)
    assert path == ckpt.latest_checkpoint(V1_RUN) and path.name == "step-00000007"
    saved = {part: load_file(str(path / f"{part}.safetensors")) for part in ("model", "ema", "optim", "rng")}
    model, opt, ema = tiny_model()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = make(tmp_path).restore(path, model, opt, scaler, ema)
    assert state == TrainState(epoch=1, step_in_epoch=2, global_step=7, best_acc=0.5, partial_meter=[1.0, 2.0, 3.0],
                               partial_seconds=1.5)
    assert all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, saved["ema"][k]) for k, v in ema.state_dict().items())
    momentum = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(m, saved["optim"][f"state.{i}.momentum_buffer"]) for i, m in enumerate(momentum))
    assert torch.equal(torch.get_rng_state(), saved["rng"]["cpu.rank0"])  # mid-epoch, same world: continued
    model(torch.randn(5, 4)).sum().backward()
    opt.step()  # the restored optimizer steps on

    # what this dtl writes for the same position has the earlier checkpoint's files and keys
    again = make(tmp_path / "again").save(model, opt, scaler, state, is_best=True, ema=ema)
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in path.iterdir())
    old, new = (json.loads((p / "state.json").read_text()) for p in (path, again))
    assert sorted(new) == sorted(old) and sorted(new["progress"]) == sorted(old["progress"])
    for part in ("model", "ema", "optim", "rng"):
        assert sorted(load_file(str(again / f"{part}.safetensors"))) == sorted(saved[part]), part
