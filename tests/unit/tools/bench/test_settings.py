"""`dtl bench`'s flags and config (`dtl.tools.bench.settings`): train's flags plus its own; synthetic data
by default."""

from __future__ import annotations

import pytest

from dtl.errors import UserError
from dtl.tools.bench import settings
from tests.unit.tools.bench.test_side_by_side import bench_args, bench_main


def test_bench_flags_are_trains_plus_its_own() -> None:
    args = bench_args(["--model", "resnet18", "--mode", "scratch", "--device", "cpu"])
    cfg = settings.bench_config(args)
    assert cfg.data.dataset == "synthetic"
    assert (cfg.data.train_subset, cfg.data.eval_subset) == settings.SYNTHETIC_COUNTS["cpu"]
    assert (cfg.backbone.model, cfg.backbone.mode, cfg.backbone.weights) == ("resnet18", "scratch", "none")
    args = bench_args(["--data-dir", "somewhere", "--device", "cpu"])
    cfg = settings.bench_config(args)
    assert cfg.data.dataset == "cifar10" and cfg.data.train_subset is None
    args = bench_args(["--steps", "0"])
    with pytest.raises(UserError, match="--steps"):
        settings.options_from_args(args, "x")
    assert bench_main(["--dataset", "folder", "--data-dir", "/nonexistent/dtl-bench", "--device", "cpu"]) == 2
