"""The small commands: models, plot, and TensorBoard logging; --help of every subcommand."""

import json
import logging

import numpy as np
import pytest

from dtl import cli, distributed
from tests.conftest import TINY, main_inproc, train_inproc


def test_every_subcommand_has_help_with_an_example(capsys):
    for cmd in ("train", "data", "models", "plot", "eval", "predict", "bench"):
        assert main_inproc(cmd, "--help") == 0
        out = capsys.readouterr().out
        assert "example" in out.lower() and "dtl " in out or "train.py" in out, cmd
    assert main_inproc("--help") == 0 and "examples:" in capsys.readouterr().out


def test_models_lists_names_params_and_weights(capsys):
    assert main_inproc("models", "--filter", "vgg16") == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("vgg16 "))
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
    assert main_inproc("plot", str(runs[0]), str(runs[1]), "--output", str(png)) == 0
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[1] > 500 and img[..., :3].std() > 0.05  # a real picture, not blank
    assert main_inproc("plot", str(tmp_path), "--output", str(png)) == 2


def test_an_op_without_deterministic_kernel_is_one_clear_message(caplog):
    def body(groups, device):
        raise RuntimeError("adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation, but "
                           "you set 'torch.use_deterministic_algorithms(True)'. You can turn off determinism ...")

    distributed.setup_logging(distributed.DistEnv())
    logging.getLogger("dtl").propagate = True
    with caplog.at_level(logging.ERROR, logger="dtl"):
        code = cli.guarded(distributed.DistEnv(), lambda: cli.in_process_group(distributed.DistEnv(), "cpu", 10, body))
    assert code == 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "adaptive_avg_pool2d_backward_cuda" in messages[0]
    assert "without --deterministic" in messages[0]
