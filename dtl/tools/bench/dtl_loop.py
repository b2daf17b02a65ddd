"""dtl's side of `dtl bench`: the training run's own code, one method per benchmarked phase."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import torch

from dtl import models
from dtl.config import Config
from dtl.distributed import ProcessGroups
from dtl.tools.bench.reference_loop import endless
from dtl.train.build import prepare
from dtl.train.evaluate import evaluate
from dtl.train.loss import criterion_for
from dtl.train.metrics import Meter
from dtl.train.step import NonFiniteSteps, train_step


class DtlLoop:
    """dtl's own pipeline and steps: built by `dtl.train.build.prepare`, stepped by `dtl.train.step.train_step`
    (grad_accum micro-batches per step), evaluated by `dtl.train.evaluate.evaluate`."""

    name = "dtl"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.parts, self.state = prepare(cfg, ProcessGroups(), device)
        self.device = device
        self.train_batches = endless(self.parts.train_loader)
        self.eval_batches = endless(self.parts.eval_loader)
        self.criterion = criterion_for(cfg.optim, self.parts.class_weights)
        self.meter = Meter(device)
        self.nonfinite = NonFiniteSteps()
        self.mixed = 0  # batches mixed by `input` (the mixer's batch index)

    def context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def input(self, steps: int) -> int:
        """The training input as the loop gets it: the loader's batches, mixed when --mixup/--cutmix is on."""
        count = 0
        for _ in range(steps):
            images, labels = next(self.train_batches)
            if self.parts.mixer is not None:
                self.parts.mixer(images, labels, 0, self.mixed)
                self.mixed += 1
            count += int(labels.shape[0])
        return count

    def train_batch(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        """One step on one micro-batch (FLOP counting)."""
        return train_step(self.parts, self.state, [(images, labels)], self.criterion, self.meter, self.nonfinite).images

    def eval_batch(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        return self._evaluate([(images, labels)])

    def _evaluate(self, batches: Any) -> int:
        parts = self.parts
        return evaluate(parts.model.wrapped, batches, self.device, parts.groups, parts.precision,
                        len(parts.splits.classes), desc=None).count

    def train_step(self, steps: int) -> int:
        parts = self.parts
        # the meter and the non-finite record keep each step's tensors until read; the bench never reads them
        self.meter, self.nonfinite = Meter(self.device), NonFiniteSteps()
        parts.model.wrapped.train()
        models.freeze_frozen_norms(parts.model.wrapped, all_stats=parts.cfg.backbone.freeze_bn_stats)
        return sum(train_step(parts, self.state, [next(self.train_batches) for _ in range(parts.accum)],
                              self.criterion, self.meter, self.nonfinite).images for _ in range(steps))

    def eval_step(self, steps: int) -> int:
        return self._evaluate(itertools.islice(self.eval_batches, steps))
