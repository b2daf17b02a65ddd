"""The small commands: models, plot, and TensorBoard logging; --help of every subcommand."""

import json

import numpy as np
import pytest

from tests.conftest import TINY, run_cli, train_inproc


def test_every_subcommand_has_help_with_an_example():
    for cmd in ("train", "data", "models", "plot", "eval", "predict"):
        res = run_cli(cmd, "--help")
        assert res.returncode == 0 and ("example" in res.stdout.lower() or "dtl " in res.stdout), cmd


def test_models_lists_names_params_and_weights():
    res = run_cli("models", "--filter", "vgg16")
    assert res.returncode == 0
    line = next(line for line in res.stdout.splitlines() if line.startswith("vgg16 "))
    assert "138,357,544" in line and "IMAGENET1K_V1 (default)" in line


def test_tensorboard_scalars_equal_metrics_and_plot_overlays_two_runs(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for seed in ("1", "2"):
        out = tmp_path / f"run{seed}"
        assert train_inproc(*TINY, "--epochs", "2", "--train-subset", "32", "--eval-subset", "16", "--seed", seed,
                            "--log-with", "tensorboard", "--output-dir", str(out)) == 0
        runs.append(out)
    rows = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(runs[0] / "tensorboard"))
    acc.Reload()
    for key in ("train_loss", "test_acc", "lr", "images_per_sec"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == [np.float32(r[key]) for r in rows]  # TensorBoard stores float32

    png = tmp_path / "cmp.png"
    res = run_cli("plot", str(runs[0]), str(runs[1]), "--output", str(png))
    assert res.returncode == 0, res.stderr
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[1] > 500 and img[..., :3].std() > 0.05  # a real picture, not blank
    res = run_cli("plot", str(tmp_path), "--output", str(png))
    assert res.returncode == 2 and "metrics.jsonl" in res.stderr
