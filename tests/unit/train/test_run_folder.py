"""dtl.train.run_folder: `--output-dir`/`--resume`/`--overwrite` resolved once into a RunPlan; the RunFolder
writes config.json and status.json."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dtl.config import Config, recipe_line
from dtl.data.splits import Split, Splits
from dtl.distributed import DistEnv, ProcessGroups
from dtl.errors import UserError
from dtl.train import run_folder
from dtl.train.checkpoint import format as ckpt
from dtl.train.train_state import TrainState

CPU = torch.device("cpu")


def fake_checkpoint(outdir, step: int):
    return ckpt.save_checkpoint(outdir, model_state={"w": torch.zeros(2)}, optim_state={"state": {},
                                "param_groups": []}, rng={}, meta={"global_step": step, "config": {},
                                                                   "num_classes": 2}, keep_last=5)


def plan(**kw):
    return run_folder.plan(Config(mode="scratch", **kw), ProcessGroups(), CPU)


def test_fresh_folder(tmp_path):
    p = plan(output_dir=str(tmp_path / "run"))
    assert (p.outdir, p.resume_from, p.split_file, p.replace) == (tmp_path / "run", None, None, False)


def test_another_run_is_not_clobbered_unless_asked(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a run"):
        plan(output_dir=str(tmp_path))
    assert plan(output_dir=str(tmp_path), overwrite=True).replace


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    assert plan(output_dir=str(tmp_path), resume="auto").resume_from is None  # nothing yet: start fresh
    fake_checkpoint(tmp_path, 3)
    newest = fake_checkpoint(tmp_path, 7)
    (tmp_path / "checkpoints" / ".tmp-step-00000009-1").mkdir()  # a killed writer's leftovers
    assert plan(output_dir=str(tmp_path), resume="auto").resume_from == newest
    with pytest.raises(UserError, match="needs --output-dir"):
        plan(resume="auto")


def test_resume_path_maps_to_its_run_folder_and_split(tmp_path):
    first = fake_checkpoint(tmp_path, 3)
    fake_checkpoint(tmp_path, 7)
    (tmp_path / "split.json").write_text("{}")
    p = plan(resume=str(first))
    assert (p.outdir, p.resume_from, p.split_file) == (tmp_path, first, tmp_path / "split.json")
    assert ckpt.run_folder_of(first) == tmp_path and ckpt.run_folder_of(tmp_path) is None
    assert plan(resume=str(tmp_path)).resume_from.name == "step-00000007"  # a run folder: its newest
    with pytest.raises(UserError, match="no such checkpoint"):
        plan(resume=str(tmp_path / "nope"))


def test_start_describes_the_run_and_status_follows_it(tmp_path):
    p = plan(output_dir=str(tmp_path / "run"))
    splits = Splits(Split(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"]),
                    Split(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.tensor([1]), ["a", "b"]))
    info = {"launcher": "python", "world_size": 1, "device": "cpu", "precision": "fp32",
            "precision_source": "test", "global_batch": 32}
    folder = run_folder.RunFolder(p, ProcessGroups())
    folder.start(Config(mode="scratch"), info, TrainState(), splits, torch.nn.Linear(2, 2))
    saved = json.loads((p.outdir / "config.json").read_text())
    assert saved["config"]["mode"] == "scratch" and saved["run"]["launcher"] == "python"
    assert json.loads((p.outdir / "status.json").read_text())["state"] == "running"
    folder.status("preempted", 75, TrainState(epoch=1, global_step=40), p.outdir / "checkpoints" / "step-40")
    status = json.loads((p.outdir / "status.json").read_text())
    assert (status["state"], status["exit_code"], status["epoch"], status["global_step"]) == ("preempted", 75, 1, 40)
    other_rank = ProcessGroups(DistEnv(rank=1, world_size=2))
    run_folder.RunFolder(p, other_rank).status("failed", 1, TrainState(), None)  # not rank 0
    assert json.loads((p.outdir / "status.json").read_text())["state"] == "preempted"


def test_start_logs_what_the_recipe_set_and_what_the_user_overrode(tmp_path):
    # our own handler on dtl's logger: caplog's depends on propagation, which other tests' setup_logging changes
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    dtl_log = logging.getLogger("dtl")
    level = dtl_log.level
    dtl_log.setLevel(logging.INFO)
    dtl_log.addHandler(handler)
    cfg = Config(mode="scratch", recipe="strong", lr=0.01, output_dir=str(tmp_path / "run"))
    splits = Splits(Split(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"]),
                    Split(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.tensor([1]), ["a", "b"]))
    info = {"launcher": "python", "world_size": 1, "device": "cpu", "precision": "fp32",
            "precision_source": "test", "global_batch": 32}
    try:
        run_folder.RunFolder(run_folder.plan(cfg, ProcessGroups(), CPU), ProcessGroups()).start(
            cfg, info, TrainState(), splits, torch.nn.Linear(2, 2))
    finally:
        dtl_log.removeHandler(handler)
        dtl_log.setLevel(level)
    lines = [r.getMessage() for r in records if r.getMessage().startswith("recipe ")]
    assert lines == [recipe_line(cfg)] and "overridden by you: lr=0.01 (recipe: " in lines[0]
