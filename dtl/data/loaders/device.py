"""The `device` pipeline: a whole split held on the device as one uint8 tensor (CIFAR, synthetic, an image folder's
decoded-image cache), each chunk of batches gathered there and transformed by the batched, exact transforms of
`dtl.data.augment` (no per-image Python, no worker processes)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from dtl.data.augment.chain import AugmentChain
from dtl.data.augment.transform import BatchTransform
from dtl.data.loaders.base import SampledLoader
from dtl.data.splits import Split, stream_seed

__all__ = ["CHUNK_PIXELS", "DeviceLoader"]

log = logging.getLogger("dtl")

#: output pixels per batched-transform call (see DeviceLoader.chunk_batches)
CHUNK_PIXELS = 512 * 32 * 32


class DeviceLoader(SampledLoader):
    """Batches from a split held on the device, transformed in batches. Iterating yields (images, labels).

    Augmentation randomness comes from one generator per (seed, epoch, rank), so an epoch's crops are
    reproducible, and a resume in the middle of an epoch replays the skipped batches' draws (cheap: random
    numbers only, `skip()`) to land on the same random stream."""

    def __init__(self, split: Split, sampler: Sampler[int], batch_size: int, transform: BatchTransform | AugmentChain,
                 device: torch.device, seed: int, rank: int) -> None:
        super().__init__(sampler, batch_size)
        self.images = _placed(split.images, device)
        self.labels = split.labels.to(device)
        self.transform, self.device, self.seed, self.rank = transform, device, seed, rank

    @property
    def chunk_batches(self) -> int:
        """Batches transformed per call: the per-call cost of the batched transform (a few hundred small
        ops) dominates at 32 px, so small outputs are produced ~512 images at a time; large ones per batch."""
        pixels = self.transform.size ** 2
        return max(1, CHUNK_PIXELS // pixels // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.int64).to(self.device, non_blocking=True)
        gen = torch.Generator(device=self.device).manual_seed(stream_seed(self.seed, self.epoch, self.rank))
        bs, per_chunk = self.batch_size, self.chunk_batches
        for first in range(0, len(self), per_chunk):
            last = min(first + per_chunk, len(self))
            idx = order[first * bs:last * bs]
            if last <= self.start_batch:  # before the resume point: same draws, no pixels
                self.transform.skip(len(idx), self.images.shape[-2:], gen)
                continue
            rows = (self.images[idx] if self.images.device == idx.device
                    else self.images[idx.cpu()].to(self.device, non_blocking=True))
            images, labels = self.transform(rows, gen), self.labels[idx]
            for b in range(max(first, self.start_batch), last):
                lo = (b - first) * bs
                yield images[lo:lo + bs], labels[lo:lo + bs]


def _placed(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The split on the device when it takes at most half of the device's free memory; else it stays in host
    memory (e.g. a large memory-mapped image cache) and each chunk of batches is gathered there and copied."""
    if device.type != "cuda" or images.device == device:
        return images.to(device)
    free, _ = torch.cuda.mem_get_info(device)
    if images.nbytes <= free // 2:
        return images.to(device)
    log.info("the %.1f GiB of images stay in host memory (the device has %.1f GiB free): batches are gathered "
             "there and copied", images.nbytes / 2**30, free / 2**30)
    return images
