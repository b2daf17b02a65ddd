import json
from pathlib import Path

import torch

from dtl.dist import DistEnv
from dtl.train.metrics import Meter, append_metrics, plot_runs, read_metrics, truncate_metrics


def test_meter_sums_not_averages_of_averages():
    meter = Meter(torch.device("cpu"))
    meter.update(torch.tensor(10.0), torch.tensor(3), 4)  # batch of 4, mean loss 2.5
    meter.update(torch.tensor(1.0), torch.tensor(1), 1)  # batch of 1, mean loss 1.0
    out = meter.reduced(DistEnv())
    assert out == {"loss": 11.0 / 5, "acc": 4 / 5, "count": 5}


def test_truncate_drops_epochs_after_the_checkpoint(tmp_path: Path):
    for epoch in (1, 2, 3):
        append_metrics(tmp_path, {"epoch": epoch, "train_loss": 1.0 / epoch})
    truncate_metrics(tmp_path, 2)
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]


def test_plot_overlays_runs(tmp_path: Path):
    import matplotlib.image

    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        for epoch in (1, 2):
            row = {"epoch": epoch, "train_loss": 1 / epoch, "test_loss": 1.2 / epoch, "train_acc": 0.5,
                   "test_acc": 0.6, "lr": 1e-3, "images_per_sec": 100.0}
            (run / "metrics.jsonl").open("a").write(json.dumps(row) + "\n")
    out = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp.png")
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 500
