"""`tests.gpu_check.runfiles` on recorded run folders: the facts the steps judge are in dtl's run files (the
process-group backend, this start's resume point, whether the cached features were computed or reused)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.gpu_check import runfiles


def test_a_plain_run_says_how_it_ran_and_ended(recorded):
    cfg, info = runfiles.config(recorded.plain), runfiles.run_info(recorded.plain)
    assert (info["precision"], info["backend"], info["launcher"]) == ("fp32", None, "python")  # no process group
    assert cfg["resumed_from"] is None and cfg["cached_features"] is None
    assert runfiles.status(recorded.plain)["state"] == "completed"
    rows = runfiles.metrics(recorded.plain)
    assert [r["epoch"] for r in rows] == [1]
    assert runfiles.last_epoch_figures(rows, ("epoch", "no_such_key")) == {"epoch": 1}
    assert runfiles.shard_files(recorded.plain) == [] and runfiles.stored_features(recorded.plain) == {}


def test_cached_features_computed_then_reused_by_the_resumed_start(recorded):
    first, second = runfiles.config(recorded.cached_first), runfiles.config(recorded.cached_second)
    assert (first["cached_features"], first["resumed_from"]) == ("computed", None)
    assert second["cached_features"] == "reused"
    assert Path(second["resumed_from"]).parent == recorded.cached_second / "checkpoints"
    assert [r["epoch"] for r in runfiles.metrics(recorded.cached_second)] == [1, 2]
    assert runfiles.stored_features(recorded.cached_second) == {"test.safetensors": [16, 64],
                                                               "train.safetensors": [32, 64]}


def test_missing_or_broken_files_read_as_empty(tmp_path):
    (tmp_path / "status.json").write_text("{not json")
    (tmp_path / "config.json").write_text("[1, 2]")
    assert runfiles.status(tmp_path) == {} and runfiles.config(tmp_path) == {} and runfiles.run_info(tmp_path) == {}
    assert runfiles.metrics(tmp_path) == [] and runfiles.read_json(tmp_path / "nope.json") == {}


def test_compare_weights_tensor_by_tensor(tmp_path):
    a = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([3]), "e": torch.empty(0)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file({**a, "w": a["w"] + 0.5}, str(tmp_path / "b.safetensors"))
    save_file({"w": a["w"]}, str(tmp_path / "c.safetensors"))
    same = runfiles.compare_weights(tmp_path / "a.safetensors", tmp_path / "a.safetensors")
    assert same == {"tensors": 3, "unequal_tensors": 0, "max_abs_diff": 0.0, "first_unequal": []}
    differ = runfiles.compare_weights(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert (differ["unequal_tensors"], differ["max_abs_diff"], differ["first_unequal"]) == (1, 0.5, ["w"])
    with pytest.raises(ValueError, match=r"different tensor names: \['e', 'n'\]"):
        runfiles.compare_weights(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
