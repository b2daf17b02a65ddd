"""WebDataset shards (written by `dtl data shards`) under torchrun with 2 processes on CPU: every rank gets the same
number of batches (the remainder rule is logged), every evaluation sample is counted once, and a resume from a
mid-epoch checkpoint ends bitwise equal to the uninterrupted run."""

from __future__ import annotations

import json

import pytest

from dtl.data.loaders.webdataset import rank_share
from tests.conftest import assert_same_weights, main_inproc, rewind_copy
from tests.e2e.test_launchers import torchrun
from tests.unit.data.test_folder import write_folder

pytest.importorskip("webdataset")
pytestmark = pytest.mark.slow


def test_shards_under_torchrun_equal_batches_exact_eval_and_resume(tmp_path):
    root = tmp_path / "images"
    write_folder(root, per_class=12, bad=False)
    shards = tmp_path / "shards"
    assert main_inproc("data", "shards", "--dataset", "folder", "--data-dir", str(root), "--val-split", "0.25",
                       "--out", str(shards), "--shard-size", "4") == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    n_train, n_val = manifest["splits"]["train"]["nsamples"], manifest["splits"]["val"]["nsamples"]
    assert n_train % 2 == 1 and n_val % 2 == 1  # a remainder over 2 ranks, both splits
    per_rank = rank_share(n_train, 2, 4)  # 27 // 2 = 13 would end in a batch of one: 12
    steps = -(-per_rank // 4)
    flags = ["--dataset", "webdataset", "--data-dir", str(shards), "--image-size", "32", "--device", "cpu",
             "--batch-size", "4", "--model", "squeezenet1_1", "--mode", "scratch", "--epochs", "2",
             "--num-workers", "1", "--shuffle-buffer", "6", "--checkpoint-every-steps", "2", "--keep-last", "20",
             "--log-every", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    res = torchrun(2, *flags, "--output-dir", str(full), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (f"{n_train} samples over 2 rank(s): each reads {per_rank}, in {steps} batches" in res.stderr
            and "left over" in res.stderr)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_count"] for r in rows] == [n_val, n_val]
    assert all(r["train_count"] == 2 * per_rank for r in rows)
    assert steps >= 3  # step 2 is in the middle of epoch 1
    rewind_copy(full, part, 2)
    res = torchrun(2, *flags, "--output-dir", str(part), "--resume", "auto", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "step-00000002" in res.stderr
    assert_same_weights(full, part)
