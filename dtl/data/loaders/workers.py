"""The `workers` pipeline: a DataLoader with worker processes and per-image transforms (torchvision v2's, or the
uint8 chain on a batch of one) -- for image folders, and a fallback for any split."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dtl.data.loaders.base import SampledLoader, ignore_stop_signals
from dtl.data.splits import DatasetSplit, stream_seed

__all__ = ["WorkerLoader"]


class _PerImageDataset(Dataset):
    """Per-image transforms for the `workers` pipeline. Each image's randomness is seeded from
    (seed, epoch, index), so results do not depend on which worker handles it or on a resume point. The
    transforms draw from torch's global CPU generator (v2 takes no generator), so it is forked around each
    image: with --num-workers 0 this runs in the trainer's process, whose dropout stream must not move."""

    def __init__(self, split: DatasetSplit, transform: Callable[[torch.Tensor], torch.Tensor], seed: int) -> None:
        self.split, self.transform, self.seed, self.epoch = split, transform, seed, 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with torch.random.fork_rng(devices=()):
            # the CPU generator only: torch.manual_seed would also reseed every CUDA generator
            torch.default_generator.manual_seed(stream_seed(self.seed, self.epoch, i))
            image = self.transform(self.split.images[i])
        return image, int(self.split.labels[i])


class WorkerLoader(SampledLoader):
    """DataLoader-based pipeline with the same interface (`BatchLoader`) as DeviceLoader. `transform`: any
    per-image callable on a uint8 (3, H, W) tensor (a v2 transform, `transforms.ChainPerImage`,
    `preprocessing.EvalResize`)."""

    def __init__(self, split: DatasetSplit, sampler: Sampler[int], batch_size: int,
                 transform: Callable[[torch.Tensor], torch.Tensor], num_workers: int, device: torch.device, seed: int,
                 channels_last: bool = True) -> None:
        super().__init__(sampler, batch_size)
        self.dataset = _PerImageDataset(split, transform, seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.num_workers, self.device = num_workers, device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.dataset.epoch = self.epoch  # before the workers start: each takes its copy of the dataset
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.remaining(),
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False,
                            # a pass draws its workers' base seed from this, not from the trainer's generator
                            # (each image is seeded on its own anyway)
                            generator=torch.Generator().manual_seed(stream_seed(self.dataset.seed, self.epoch)),
                            worker_init_fn=ignore_stop_signals if self.num_workers else None)
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format),
                   labels.to(self.device, non_blocking=True))
