"""The `decode` pipeline (image folders, HF data sets): DataLoader workers read the encoded images every pass -- on a
CPU they also decode them and resize them to squares; on a GPU each batch is decoded there (nvJPEG, batched) and
resized -- then the squares are transformed as by the `device` pipeline."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dtl.data.augment.chain import AugmentChain
from dtl.data.augment.transform import BatchTransform
from dtl.data.images import decode_batch
from dtl.data.loaders.base import SampledLoader, ignore_stop_signals
from dtl.data.preprocessing import eval_resize
from dtl.data.splits import EncodedSplit, stream_seed

__all__ = ["DecodeLoader"]


class _Files(Dataset):
    """The `decode` pipeline's worker side: image i's encoded bytes (decoded on the GPU by the main process), or
    on a CPU its decoded square (`preprocessing.eval_resize`) -- the per-image work that parallelises over
    workers."""

    def __init__(self, split: EncodedSplit, size: int, decode_here: bool) -> None:
        self.split, self.size, self.decode_here = split, size, decode_here

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.decode_here:  # the split's images: --image-decoder (a folder's file that fails now is replaced, logged)
            return eval_resize(self.split.images[i], self.size), int(self.split.labels[i])
        return self.split.encoded(i), int(self.split.labels[i])


def _collate_bytes(items: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [b for b, _ in items], torch.tensor([lab for _, lab in items], dtype=torch.int64)


class DecodeLoader(SampledLoader):
    """Batches decoded from an image folder's files (or an HF data set's rows) every pass (`--data-pipeline decode`),
    augmented as by `DeviceLoader` (the same batched transforms, a generator per (seed, epoch, rank); a resume replays
    the skipped batches' draws). On a GPU the workers only read bytes and each batch's JPEGs are decoded in one
    nvJPEG call (`images.decode_batch`), then resized to squares on the GPU; on a CPU the workers decode and
    resize. `transform` None: the uint8 squares themselves (what `KeptEvalLoader` keeps)."""

    def __init__(self, split: EncodedSplit, sampler: Sampler[int], batch_size: int,
                 transform: BatchTransform | AugmentChain | None, size: int, num_workers: int, device: torch.device,
                 seed: int, rank: int, decoder: str = "auto") -> None:
        super().__init__(sampler, batch_size)
        self.split, self.transform = split, transform
        self.size, self.num_workers, self.device, self.seed, self.rank = size, num_workers, device, seed, rank
        self.decoder, self.on_device = decoder, device.type == "cuda"

    def _squares(self, batch: list[torch.Tensor] | torch.Tensor, idx: list[int]) -> torch.Tensor:
        if not self.on_device:
            return batch.to(self.device)  # type: ignore[union-attr] - decoded by the workers
        try:
            decoded = decode_batch(None, self.device, self.decoder, encoded=batch)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - an image the CPU cannot decode either: the split's images handle it
            decoded = [self.split.images[i].to(self.device) for i in idx]
        return torch.stack([eval_resize(img, self.size) for img in decoded])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device=self.device).manual_seed(stream_seed(self.seed, self.epoch, self.rank))
        order, bs = list(self.sampler), self.batch_size
        if self.transform is not None:
            for b in range(self.start_batch):  # before the resume point: same draws, no pixels
                self.transform.skip(len(order[b * bs:(b + 1) * bs]), (self.size, self.size), gen)
        indices = order[self.start_batch * bs:]
        dataset = _Files(self.split, self.size, decode_here=not self.on_device)
        loader = DataLoader(dataset, batch_size=bs, sampler=indices, num_workers=self.num_workers,
                            pin_memory=self.on_device, collate_fn=_collate_bytes if self.on_device else None,
                            worker_init_fn=ignore_stop_signals if self.num_workers else None)
        for k, (batch, labels) in enumerate(loader):
            squares = self._squares(batch, indices[k * bs:(k + 1) * bs])
            images = squares if self.transform is None else self.transform(squares, gen)
            yield images, labels.to(self.device, non_blocking=True)
