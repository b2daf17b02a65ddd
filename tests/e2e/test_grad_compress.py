"""--grad-compress under torchrun (2 processes, gloo): PowerSGD's bytes per step logged, and a mid-epoch resume
that continues its error feedback and ends bitwise equal to the uninterrupted run (bf16: tests/unit/distributed)."""

from __future__ import annotations

import json

import pytest

from dtl import models
from dtl.distributed.compress import step_bytes
from tests.conftest import TINY, assert_same_weights, rewind_copy
from tests.e2e.test_launchers import torchrun

pytestmark = pytest.mark.slow
FLAGS = [*TINY, "--epochs", "2", "--train-subset", "64", "--eval-subset", "16", "--batch-size", "8",
         "--checkpoint-every-steps", "3", "--keep-last", "20", "--dist-timeout", "60"]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _shapes():
    return [tuple(p.shape) for p in models.build_model("squeezenet1_1", 10, "none", 32).parameters()]


def test_powersgd_bytes_logged_and_mid_epoch_resume_is_bitwise(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    res = torchrun(2, *FLAGS, "--grad-compress", "powersgd", "--powersgd-rank", "4", "--output-dir", str(full))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gradient all-reduce compressed: powersgd" in res.stderr
    plain, psgd = step_bytes(_shapes(), "none"), step_bytes(_shapes(), "powersgd", rank=4)
    # 4 steps per epoch; steps 0 and 1 all-reduce plainly (--powersgd-start-iter 2), then PowerSGD
    assert [r["comm_bytes_per_step"] for r in _rows(full)] == [(2 * plain + 2 * psgd) / 4, psgd]
    assert sorted(p.name for p in (full / "checkpoints" / "step-00000006").glob("rank-*")) == [
        "rank-00000.safetensors", "rank-00001.safetensors"]  # each rank's own error feedback
    rewind_copy(full, part, 6)  # mid-epoch 2, PowerSGD running with warm-started Q and error feedback
    res = torchrun(2, *FLAGS, "--grad-compress", "powersgd", "--output-dir", str(part), "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step-00000006" in res.stderr
    assert_same_weights(full, part)

