"""The one evaluation loop: training-time evaluation, `dtl eval` and `dtl bench` all run `evaluate()`.

Each rank evaluates its contiguous shard (`dtl.data.samplers.EvalShardSampler`: no padding) and the sums are
all-reduced, so every image counts exactly once at any world size. Everything is summed on the device; the
only host sync is the final read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from dataclasses import dataclass

import torch
from torch import nn

from dtl.distributed import ProcessGroups, fsdp, local_module
from dtl.train.optimisation.precision import Precision
from dtl.train.progress_bar import Progress


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracies over all ranks (sums divided once, never averages of averages). With test-time
    augmentation these are the augmented numbers, and `plain` holds the un-augmented ones of the same pass."""

    loss: float
    top1: float
    top5: float
    """Top-min(5, classes) accuracy."""
    count: int
    confusion: torch.Tensor | None = None
    """C x C counts on the CPU (rows: true class, columns: prediction), when asked for."""
    plain: EvalResult | None = None
    """--tta flip: the numbers without it (the image alone)."""


def tta_logits(model: nn.Module, images: torch.Tensor, tta: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain logits, test-time-augmented logits) in float32; flip: the mean of the logits of the images and
    of their horizontal mirrors (what timm and torchvision's references call flip TTA)."""
    plain = model(images).float()
    if tta == "none":
        return plain, plain
    return plain, (plain + model(images.flip(-1)).float()) / 2


def _sums(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Loss sum, top-1 and top-k hits of one batch (float64, on the device)."""
    pred = logits.argmax(1)
    hit1 = pred == labels
    hitk = (logits.topk(k, dim=1).indices == labels[:, None]).any(1) | hit1
    loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
    return torch.stack([loss.double(), hit1.sum().double(), hitk.sum().double()])


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             groups: ProcessGroups, precision: Precision, num_classes: int | None = None, confusion: bool = False,
             desc: str | None = "eval", tta: str = "none") -> EvalResult:
    """Evaluate `model` on this rank's `batches` and sum over the ranks of `groups`. Runs without the DDP/compile
    wrappers (`distributed.local_module`): a DDP forward would start buffer broadcasts that a rank without an eval
    batch never joins. `num_classes` is needed for top-5 (when fewer than 5) and the confusion matrix; `desc`: the
    progress bar's label on rank 0 (None: no bar); `tta`: none | flip (see `tta_logits`)."""
    model = local_module(model)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, 4, dtype=torch.float64, device=device)  # (tta, plain) x (loss, top-1, top-k, count)
    classes = torch.arange(num_classes or 0, device=device)
    matrix = torch.zeros(len(classes), len(classes), dtype=torch.int64, device=device)
    shown = groups.env.is_main and desc is not None
    bar = Progress(len(batches) if isinstance(batches, Sized) else 0, desc or "", shown)
    with fsdp.gathered(model):  # sharded: the full parameters, so that ranks need not run the same batches
        for images, labels in batches:
            with precision.autocast():
                plain, logits = tta_logits(model, images, tta)
            k = min(5, num_classes or logits.shape[1])
            totals[0, :3] += _sums(logits, labels, k)
            if tta != "none":
                totals[1, :3] += _sums(plain, labels, k)
            totals[:, 3] += labels.shape[0]  # a Python number: a kernel argument, not a host-to-device copy
            if confusion:
                # a product of one-hot matrices instead of bincount, whose output size depends on the data (a host
                # sync per batch); exact in float32 (0/1 inputs, sums below 2**24)
                pred = logits.argmax(1)
                matrix += ((labels[:, None] == classes).float().T @ (pred[:, None] == classes).float()).long()
            bar.tick()
    bar.close()
    model.train(was_training)
    groups.all_reduce_sum(totals)
    if confusion:
        groups.all_reduce_sum(matrix)
    (loss, top1, topk, count), plain_sums = totals.tolist()
    n = max(count, 1)
    plain_result = EvalResult(*(v / n for v in plain_sums[:3]), int(count)) if tta != "none" else None
    return EvalResult(loss / n, top1 / n, topk / n, int(count), matrix.cpu() if confusion else None, plain_result)
