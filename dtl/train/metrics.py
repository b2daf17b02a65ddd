"""Metrics: device-side sums, the per-epoch JSON lines, and the curves plot."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dtl.distributed import ProcessGroups
from dtl.train.trackers import Tracker, scalars

METRICS_FILE = "metrics.jsonl"


class Meter:
    """Loss sum, correct count and image count of the batches seen, reduced across ranks as sums; averages are
    taken only at the end (never averages of averages).

    A training step only appends its batch's device tensors (`add`): no operation and no host sync per step,
    where each small op is a kernel launch and microseconds of host time. They are summed when the totals are
    read (`local`, `reduced_totals`: where the host waits anyway), in float64 one batch after the other, in the
    order they came: the same bits whenever the reads happen (a resumed run reads at other times than an
    uninterrupted one)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals = [0.0, 0.0, 0.0]
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []

    def add(self, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        """One batch: `loss` its mean loss, `correct` its correct predictions (device tensors), `count` its
        images. A batch whose loss is not finite (a step skipped, or about to abort the run) is left out of
        all three sums. One op here (the batch's loss sum, in the loss's dtype); the rest when read."""
        loss = loss.detach()
        self._pending.append((loss, loss * count, correct.detach(), count))

    def _fold(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        finite = torch.stack([loss for loss, _, _, _ in pending]).isfinite().tolist()
        sums = torch.stack([loss_sum for _, loss_sum, _, _ in pending]).double().tolist()
        corrects = torch.stack([correct for _, _, correct, _ in pending]).tolist()
        totals = self.totals
        for ok, loss_sum, correct, (_, _, _, count) in zip(finite, sums, corrects, pending):
            if ok:  # Python floats are IEEE float64: the same sums as float64 tensors added in this order
                totals = [totals[0] + loss_sum, totals[1] + float(correct), totals[2] + float(count)]
        self.totals = totals

    def load(self, values: list[float]) -> None:
        self._pending = []
        self.totals = [float(v) for v in values]

    def local(self) -> list[float]:
        """[loss sum, correct, count] of this rank (a host sync when batches are pending)."""
        self._fold()
        return list(self.totals)

    def reduced_totals(self, groups: ProcessGroups) -> list[float]:
        """[loss sum, correct, count] over all ranks (one collective, one host sync)."""
        totals = torch.tensor(self.local(), dtype=torch.float64, device=self.device)
        return groups.all_reduce_sum(totals).tolist()

    def reduced(self, groups: ProcessGroups) -> dict[str, float]:
        """{'loss', 'acc', 'count'} over all ranks."""
        loss, correct, count = self.reduced_totals(groups)
        return {"loss": loss / max(count, 1), "acc": correct / max(count, 1), "count": int(count)}


def read_metrics(outdir: Path) -> list[dict[str, Any]]:
    path = outdir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(outdir: Path, completed_epochs: int) -> None:
    """On resume, drop lines of epochs the checkpoint does not cover (written after it, before a crash), so
    metrics.jsonl never holds an epoch twice."""
    path = outdir / METRICS_FILE
    rows = [r for r in read_metrics(outdir) if r["epoch"] <= completed_epochs]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def append_metrics(outdir: Path, row: dict[str, Any]) -> None:
    with open(outdir / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


class MetricsLog:
    """Rank 0's per-epoch log: a line in OUTDIR/metrics.jsonl, and the same scalars to each tracker
    (`dtl.train.trackers`: TensorBoard, W&B, MLflow)."""

    def __init__(self, outdir: Path, trackers: Sequence[Tracker] = ()) -> None:
        self.outdir = outdir
        self.trackers = list(trackers)

    def append(self, row: dict[str, Any]) -> None:
        append_metrics(self.outdir, row)
        values = scalars(row)
        for tracker in self.trackers:
            tracker.log_metrics(int(row.get("global_step", row["epoch"])), values)

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        for tracker in self.trackers:
            for path in paths:
                if path.is_file():
                    tracker.log_artifact(path)

    def close(self, state: str = "completed") -> None:
        """`state`: how the run ended (completed, preempted, failed), for the trackers' run status."""
        for tracker in self.trackers:
            tracker.finish(state)
        self.trackers = []


def plot_runs(run_dirs: list[Path], output: Path, labels: list[str] | None = None) -> Path:
    """Loss, accuracy, learning rate and throughput vs epoch; several runs overlaid with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [("loss", ("train_loss", "test_loss")), ("accuracy", ("train_acc", "test_acc")),
              ("learning rate", ("lr",)), ("images/s", ("images_per_sec",))]
    for i, run in enumerate(run_dirs):
        rows = read_metrics(run)
        label = labels[i] if labels else run.name
        epochs = [r["epoch"] for r in rows]
        for ax, (title, keys) in zip(axes.flat, panels):
            for key in keys:
                if rows and key in rows[0]:
                    # one colour per run; train solid, test dashed
                    style = "--" if key.startswith("test") else "-"
                    ax.plot(epochs, [r[key] for r in rows], style, color=f"C{i % 10}", marker="o",
                            label=f"{label} {key}")
            ax.set_title(title)
            ax.set_xlabel("epoch")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def plot_confusion(confusion: torch.Tensor, classes: list[str], output: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix as an image (counts written in the cells when there are few)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(classes)
    counts = confusion.double()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    side = min(4 + 0.45 * c, 30)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= 40:
        ax.set_xticks(range(c), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(c), classes, fontsize=8)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
