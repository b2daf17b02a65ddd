"""The strong reference of `dtl bench`: the short training loop a competent PyTorch user writes by hand.

* the data set's uint8 images and labels resident on the device;
* per step: random indices -> index -> float -> bilinear resize to the image size on the device -> normalise ->
  the memory format dtl picks (`dtl.models.memory_format`: channels_last on GPUs; on CPUs only when no
  convolution trains, since oneDNN's channels_last convolution backward is slower there);
* the precision dtl uses (bf16 autocast on GPUs that have it; fp16 autocast + GradScaler where dtl uses fp16;
  fp32 on CPUs), ``cudnn.benchmark`` on CUDA;
* ``SGD(momentum=0.9)`` fused on CUDA (foreach on CPUs, where no fused SGD helps), ``zero_grad(set_to_none=True)``;
* the same parameters train as in dtl's mode; in transfer mode the frozen prefix runs under ``torch.no_grad``
  and only the head builds a graph;
* no host sync inside its steps: no ``loss.item()``, the eval's correct count stays on the device.

No random crop or flip: it trains on resized whole images. Evaluation runs the test images in order, same
preprocessing, under ``no_grad``. `dtl.tools.bench.strong_rate` times its training step alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dtl import models
from dtl.config import Config
from dtl.distributed import DistEnv
from dtl.tools.bench.reference_loop import task_model
from dtl.train.optimisation.precision import resolve

Batch = tuple[torch.Tensor, torch.Tensor]


def split_head(net: nn.Module, head: str) -> tuple[nn.Module, nn.Module] | None:
    """(frozen prefix, head) when the head is the model's last step (a Linear classifier, as dtl's cached
    features also assume): the prefix is the model with an identity in the head's place. None otherwise
    (SqueezeNet classifies with a convolution followed by pooling)."""
    module = net.get_submodule(head)
    if not isinstance(module, nn.Linear):
        return None
    parent_name, _, leaf = head.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, leaf, nn.Identity())
    return net, module


class StrongLoop:
    """The hand-written loop, one method per benchmarked phase (`dtl.tools.bench.timing.BenchLoop`)."""

    name = "strong"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        splits, net = task_model(cfg)
        b = cfg.backbone
        self.device, self.size, self.batch_size = device, cfg.data.image_size, cfg.optim.batch_size
        self.precision = resolve(cfg.run.precision, DistEnv(), device)  # what dtl's run would use
        self.memory_format = models.memory_format(device.type, b.mode)
        params = [p for p in net.parameters() if p.requires_grad]
        self.net = net.to(device, memory_format=self.memory_format)
        self.parts = split_head(self.net, models.head_name(self.net)) if b.mode == "transfer" else None
        if b.mode == "transfer" and self.parts is None:  # no clean split: the prefix under no_grad by hooks
            models.run_prefix_without_grad(self.net, models.head_name(self.net))
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=0.9, **fast)
        self.scaler = self.precision.grad_scaler()
        prep = models.preprocessing(b.model)
        self.mean = torch.tensor(prep.mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(prep.std, device=device).view(1, -1, 1, 1) * 255
        self.train_images, self.train_labels = splits.train.images.to(device), splits.train.labels.to(device)
        self.test_images, self.test_labels = splits.test.images.to(device), splits.test.labels.to(device)
        self.generator = torch.Generator(device=device).manual_seed(cfg.run.seed)
        self.train_batches: Iterator[Batch] = self._random_batches()
        self.eval_batches: Iterator[Batch] = self._ordered_batches()
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    # ---- the input pipeline ----
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)

    def _random_batches(self) -> Iterator[Batch]:
        n = self.train_labels.shape[0]
        while True:
            idx = torch.randint(n, (self.batch_size,), device=self.device, generator=self.generator)
            yield self.preprocess(self.train_images[idx]), self.train_labels[idx]

    def _ordered_batches(self) -> Iterator[Batch]:
        n = self.test_labels.shape[0]
        while True:
            for start in range(0, n, self.batch_size):
                end = min(start + self.batch_size, n)
                yield self.preprocess(self.test_images[start:end]), self.test_labels[start:end]

    # ---- the phases ----
    def context(self) -> contextlib.AbstractContextManager:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.backends.cudnn.flags(enabled=True, benchmark=True)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.parts is None:
            return self.net(images)
        prefix, head = self.parts
        with torch.no_grad():
            features = prefix(images)
        return head(features)

    def input(self, steps: int) -> int:
        return sum(int(next(self.train_batches)[1].shape[0]) for _ in range(steps))

    def train_batch(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            loss = F.cross_entropy(self.logits(images), labels)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return int(labels.shape[0])

    def eval_batch(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        with torch.no_grad(), self.precision.autocast():
            self.correct += (self.logits(images).argmax(1) == labels).sum()
        return int(labels.shape[0])

    def train_step(self, steps: int) -> int:
        self.net.train()
        models.freeze_frozen_norms(self.net)  # a frozen backbone's BatchNorm statistics stay fixed, as in dtl
        return sum(self.train_batch(*next(self.train_batches)) for _ in range(steps))

    def eval_step(self, steps: int) -> int:
        self.net.eval()
        return sum(self.eval_batch(*next(self.eval_batches)) for _ in range(steps))
