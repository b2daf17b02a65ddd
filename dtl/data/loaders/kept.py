"""Evaluation that decodes an image folder once: the first pass's decoded, resized uint8 batches are kept, when
this rank's share fits `--eval-memory-mib`, and later passes read them instead of the files."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from dtl.data.loaders.base import BatchLoader

__all__ = ["KeptEvalLoader"]


class KeptEvalLoader:
    """Evaluation that decodes once: the first complete pass takes `inner`'s uint8 batches (decoded and resized,
    not yet normalised) and keeps them where they are (the device); every pass yields `finish(batch)`. Later
    passes read the kept batches instead of the files. A wrapper: `inner` owns the sampler and the epoch."""

    def __init__(self, inner: BatchLoader, finish: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.inner, self.finish = inner, finish
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch
        self.inner.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.kept is not None:
            for images, labels in self.kept[self.start_batch:]:
                yield self.finish(images), labels
            return
        kept = []
        for images, labels in self.inner:
            kept.append((images, labels))
            yield self.finish(images), labels
        if not self.start_batch:
            self.kept = kept  # a whole pass: from now on the files are not read again
