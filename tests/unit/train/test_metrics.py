import json
from pathlib import Path

import torch

from dtl.distributed import ProcessGroups
from dtl.train.metrics import Meter, append_metrics, plot_runs, read_metrics, truncate_metrics


def test_meter_sums_not_averages_of_averages():
    meter = Meter(torch.device("cpu"))
    meter.add(torch.tensor(2.5), torch.tensor(3), 4)  # batch of 4, mean loss 2.5
    meter.add(torch.tensor(1.0), torch.tensor(1), 1)  # batch of 1, mean loss 1.0
    out = meter.reduced(ProcessGroups())
    assert out == {"loss": 11.0 / 5, "acc": 4 / 5, "count": 5}


def test_meter_leaves_out_batches_whose_loss_is_not_finite():
    meter = Meter(torch.device("cpu"))
    meter.add(torch.tensor(2.0), torch.tensor(3), 4)
    meter.add(torch.tensor(float("nan")), torch.tensor(2), 4)
    meter.add(torch.tensor(float("inf")), torch.tensor(2), 4)
    assert meter.local() == [8.0, 3.0, 4.0]


def test_meter_sums_are_the_same_bits_whenever_they_are_read():
    """The per-step values are summed when read; a resumed run reads (checkpoints, log lines) at other steps
    than an uninterrupted one, so the sums must not depend on when: float64, batch after batch, in order --
    the same as float64 tensors added one step at a time."""
    g = torch.Generator().manual_seed(0)
    losses = (torch.rand(200, generator=g) * 7).tolist()
    counts = [32] * 199 + [17]
    expected = torch.zeros(3, dtype=torch.float64)
    for loss, n in zip(losses, counts):
        expected[0] += (torch.tensor(loss) * n).to(torch.float64)
        expected[1] += 3
        expected[2] += n
    for read_every in (1, 7, 200):
        meter = Meter(torch.device("cpu"))
        for i, (loss, n) in enumerate(zip(losses, counts)):
            meter.add(torch.tensor(loss), torch.tensor(3), n)
            if (i + 1) % read_every == 0:
                meter.local()
        assert meter.local() == expected.tolist(), read_every
    before = Meter(torch.device("cpu"))  # a checkpoint after 120 steps, then a resumed run's meter
    for loss, n in zip(losses[:120], counts[:120]):
        before.add(torch.tensor(loss), torch.tensor(3), n)
    resumed = Meter(torch.device("cpu"))
    resumed.load(before.local())
    for loss, n in zip(losses[120:], counts[120:]):
        resumed.add(torch.tensor(loss), torch.tensor(3), n)
    assert resumed.local() == expected.tolist()


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
