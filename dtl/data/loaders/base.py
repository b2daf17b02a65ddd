"""What every loader is (`BatchLoader`: what the training and evaluation loops may rely on), and what the
sampler-driven ones share (`SampledLoader`: the sampler's epoch, the batch a pass starts at, the number of
batches per pass)."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import Sampler

__all__ = ["BatchLoader", "SampledLoader", "ignore_stop_signals"]


@runtime_checkable
class BatchLoader(Protocol):
    """What the training and evaluation loops use of a loader: `set_epoch` before each pass (reshuffles the
    training shard; `start_batch` > 0 resumes in the middle of an epoch, skipping the batches already
    trained on), `len()` (batches per pass, the skipped ones included) and iteration, which yields this
    rank's (images, labels) batches as tensors on the device (a `dtl.data.features.FeatureLoader` under flip
    TTA adds a third: the mirrored images' features)."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class SampledLoader:
    """The part of a `BatchLoader` that a sampler drives: this rank's indices come from `sampler` (a training
    sampler reshuffles on `set_epoch`, see `dtl.data.samplers`), in batches of `batch_size`; a pass yields the
    batches from `start_batch` on. Subclasses implement `__iter__`."""

    def __init__(self, sampler: Sampler[int], batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        if hasattr(self.sampler, "set_epoch"):  # the training samplers reshuffle per epoch
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]

    def remaining(self) -> list[int]:
        """This pass's indices from the resume point on (the first `start_batch` batches left out)."""
        return list(self.sampler)[self.start_batch * self.batch_size:]


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave stop signals to the trainer: a SIGUSR1/SIGTERM forwarded to the whole process
    group must not kill a spawn/forkserver-started worker mid-batch (the main process checkpoints first)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
