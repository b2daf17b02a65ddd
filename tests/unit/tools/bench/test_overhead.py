"""`python -m dtl.tools.bench.overhead`: both loops run, dtl's side is its own epoch loop, the ratio is reported."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from dtl.tools.bench import overhead


def test_overhead_bench_runs_both_loops_and_reports_the_ratio(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "overhead.json"
    assert overhead.main(["--steps", "20", "--repeats", "3", "--warmup", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    us = result["us_per_step"]
    assert us["dtl"] > 0 and us["bare"] > 0 and len(result["runs_us"]["dtl"]) == 3
    assert result["ratio"] == pytest.approx(us["dtl"] / us["bare"])
    assert result["ratio_paired"] == pytest.approx(statistics.median(
        d / b for d, b in zip(result["runs_us"]["dtl"], result["runs_us"]["bare"])))
    assert "dtl / bare" in capsys.readouterr().out


def test_overhead_bench_runs_dtl_s_own_epoch_loop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """dtl's side is loop.train_one_epoch itself (agreement, meters, progress, checks), not a copy of it."""
    from dtl.train import loop

    calls = []
    original = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = overhead.measure(steps=5, repeats=1, warmup=0)
    assert len(calls) == 5 and result["meta"]["steps"] == 5
