"""The webdataset loader (`--dataset webdataset`): tar shards streamed by DataLoader workers, decoded and resized to
squares there (on a GPU: read there, decoded in batches by nvJPEG), then augmented in batches as by the `decode`
pipeline.

An epoch, for training (`ShardLoader`, `train=True`):

1. The shards are put in an order drawn from (seed, epoch), the same on every rank; the epoch's samples are the
   shards' readable samples in that order, N of them.
2. Every rank reads the same number of samples, N // W (W ranks) -- one less when that would end in a batch of
   one image -- as one contiguous run of that sequence: rank r the r-th run. So every rank has the same number of
   batches and no rank waits for another at the last all-reduce. The few samples left over (N mod W, at most
   W - 1, plus that one) are not read in this epoch; as the shard order changes with the epoch, it is other
   samples each time. The rule and the numbers are logged once.
3. A rank's run is split among its DataLoader workers in contiguous blocks of whole batches (worker k reads the
   k-th block of shards and offsets); each worker shuffles its stream window by window: every `--shuffle-buffer`
   consecutive samples are permuted by a generator drawn from (seed, epoch, rank, worker, window).
4. The batches come in turn from the workers (worker 0, 1, ..., 0, 1, ...: `batch_order`); each batch carries its
   worker's number and the loader yields them in that order, also after a resume (when the DataLoader's own round
   robin, which always starts at worker 0, would not).

Evaluation (`train=False`): the shards in their order, rank r reads the samples [r N / W, (r + 1) N / W), no
shuffling, nothing left over: every evaluation sample is counted exactly once at any world size.

Resuming in the middle of an epoch: the loader is handed a sample position within the epoch (`set_position`;
`set_epoch` derives it from the batch position the training loop keeps today, in one place). At the same world
size and number of workers the resume is exact: each worker's share of the batches already consumed follows from
the round robin, and the worker restarts reading at the start of the shuffle window that holds its next sample
(shard and offset from the shards' counts: at most `--shuffle-buffer` samples are read again), drops what it had
already yielded, and continues with the same samples in the same order; the batched augmentation replays the
skipped batches' random draws. At another world size (or number of workers) the ranks' runs differ: each rank
skips the same fraction of its own run, so the epoch goes on with the right number of samples left, but not
exactly the samples that were left.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dtl.data.augment.chain import AugmentChain
from dtl.data.augment.transform import BatchTransform
from dtl.data.images import BadImage, as_byte_tensor, decode_batch, decode_bytes
from dtl.data.loaders.base import ignore_stop_signals
from dtl.data.preprocessing import eval_resize
from dtl.data.splits import stream_seed
from dtl.data.webdataset import ShardSplit, describe, image_of, label_of, samples
from dtl.errors import UserError

__all__ = ["ShardLoader", "batch_order", "rank_share", "worker_blocks"]

log = logging.getLogger("dtl")


def rank_share(n: int, world: int, batch_size: int) -> int:
    """Samples every rank reads in a training epoch of `n`: n // world, less one when that would end in a batch of
    one image (BatchNorm cannot normalise a single sample)."""
    per = n // world
    return per - 1 if per > 1 and per % batch_size == 1 else per


def worker_blocks(batches: int, workers: int) -> list[tuple[int, int]]:
    """[first, last) batches of each worker: contiguous blocks, the last ones the longest."""
    return [(k * batches // workers, (k + 1) * batches // workers) for k in range(workers)]


def batch_order(blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(worker, its j-th batch) in the order the DataLoader yields them: round robin over the workers, a worker
    that has run out dropping out."""
    longest = max((hi - lo for lo, hi in blocks), default=0)
    return [(k, j) for j in range(longest) for k, (lo, hi) in enumerate(blocks) if j < hi - lo]


class _Stream(IterableDataset):
    """A worker's part of an epoch: the global samples [begin, end) of the epoch's shard order, shuffled window by
    window, the first `skip` outputs dropped, decoded (or read) and batched."""

    def __init__(self, split: ShardSplit, order: list[int], parts: list[tuple[int, int, int]], batch_size: int,
                 size: int, window: int, seed: tuple[Any, ...], decode_here: bool) -> None:
        self.split, self.order, self.parts, self.batch_size = split, order, parts, batch_size
        self.size, self.window, self.seed, self.decode_here = size, window, seed, decode_here

    def _read(self, begin: int, end: int) -> Iterator[tuple[str, str, bytes | None, int]]:
        """(url, key, image bytes, label) of the samples [begin, end) of the epoch's sequence."""
        position = 0
        for idx in self.order:
            shard = self.split.shards[idx]
            if position + shard.count <= begin:
                position += shard.count
                continue
            seen = 0
            for sample in samples(shard.url):
                key = sample["__key__"]
                if key in shard.skip:
                    continue
                if seen >= shard.count or position >= end:
                    break
                seen += 1
                position += 1
                if position <= begin:
                    continue  # before this worker's start: read past, not decoded
                label = label_of(sample, self.split.label_key)
                if label is None:
                    raise UserError(f"{describe(shard.url, key)} has no label (an integer under the key "
                                    f"{self.split.label_key!r}): the shard changed since it was counted? write it "
                                    "again (`dtl data shards`)")
                yield shard.url, key, image_of(sample, self.split.image_key), label
            if seen < shard.count and position < end:
                raise UserError(f"{shard.url} ended after {seen} of its {shard.count} samples: truncated, or changed "
                                "since it was counted; copy or write it again")
            if position >= end:
                return

    def _shuffled(self, worker: int, begin: int, end: int, skip: int) -> Iterator[tuple[str, str, bytes | None, int]]:
        if self.window <= 1:
            yield from self._read(begin + skip, end)
            return
        first = skip // self.window  # the window holding the first sample to yield: read from its start
        stream = self._read(begin + first * self.window, end)
        for w in itertools.count(first):
            chunk = list(itertools.islice(stream, self.window))
            if not chunk:
                return
            gen = torch.Generator().manual_seed(stream_seed(*self.seed, worker, w))
            order = torch.randperm(len(chunk), generator=gen).tolist()
            drop = skip - first * self.window if w == first else 0
            for p in order[drop:]:
                yield chunk[p]

    def _image(self, url: str, key: str, data: bytes | None) -> torch.Tensor | None:
        """The sample's square (on a CPU) or its bytes (for the GPU); None when it cannot be decoded and bad images
        are skipped."""
        try:
            if data is None:
                raise BadImage("no image")
            if not self.decode_here:
                return as_byte_tensor(data)
            return eval_resize(decode_bytes(data, self.split.decoder), self.size)
        except BadImage as err:
            if not self.split.skip_bad:
                raise UserError(f"cannot decode the image of {describe(url, key)} ({err}): fix the shard, or pass "
                                "--skip-bad-images to skip such images (counted)") from None
            return None

    def __iter__(self) -> Iterator[tuple[int, Any, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        begin, end, skip = self.parts[worker]
        batch: list[tuple[torch.Tensor | None, int, str]] = []
        for url, key, data, label in self._shuffled(worker, begin, end, skip):
            batch.append((self._image(url, key, data), label, describe(url, key)))
            if len(batch) == self.batch_size:
                yield worker, *self._collate(batch)
                batch = []
        if batch:
            yield worker, *self._collate(batch)

    def _collate(self, batch: list[tuple[torch.Tensor | None, int, str]]) -> tuple[Any, torch.Tensor]:
        good = [i for i, (img, _, _) in enumerate(batch) if img is not None]
        if len(good) < len(batch):  # --skip-bad-images: a readable image of the batch takes each bad one's place
            if not good:
                raise UserError(f"no image of a batch can be decoded (first: {batch[0][2]}): the shards are damaged")
            bad = [b[2] for b in batch if b[0] is None]
            log.warning("--skip-bad-images: skipped %d unreadable image(s) (%s%s); another image of the batch takes "
                        "each one's place, so every rank keeps the same number of full batches", len(bad), bad[0],
                        ", ..." if len(bad) > 1 else "")
            batch = [b if b[0] is not None else batch[good[i % len(good)]] for i, b in enumerate(batch)]
        labels = torch.tensor([lab for _, lab, _ in batch], dtype=torch.int64)
        images = [img for img, _, _ in batch]
        return (torch.stack(images) if self.decode_here else images), labels  # type: ignore[arg-type]


class ShardLoader:
    """This rank's batches of a `ShardSplit` (see the module docstring): a `dtl.data.loaders.base.BatchLoader`.
    `transform` None: the uint8 squares themselves (what `KeptEvalLoader` keeps)."""

    def __init__(self, split: ShardSplit, batch_size: int, transform: BatchTransform | AugmentChain | None,
                 size: int, num_workers: int, device: torch.device, seed: int, rank: int, world_size: int,
                 train: bool, shuffle_buffer: int = 1000) -> None:
        self.split, self.batch_size, self.transform, self.size = split, batch_size, transform, size
        self.num_workers, self.device, self.seed, self.rank, self.world = num_workers, device, seed, rank, world_size
        self.train, self.window = train, shuffle_buffer if train else 0
        self.epoch, self.start_batch = 0, 0
        self.on_device = device.type == "cuda"
        n = len(split)
        if train:
            self.begin, self.count = rank * rank_share(n, world_size, batch_size), rank_share(n, world_size, batch_size)
            if rank == 0:
                self._log_rule(n)
        else:
            self.begin = rank * n // world_size
            self.count = (rank + 1) * n // world_size - self.begin

    def _log_rule(self, n: int) -> None:
        per, bs = self.count, self.batch_size
        left = n - per * self.world
        last = per - (len(self) - 1) * bs if per else 0
        log.info("webdataset epoch: %d samples over %d rank(s): each reads %d, in %d batches (the last of %d); the %d "
                 "left over (N mod world size%s) are not read this epoch -- others each epoch, as the shard order is "
                 "reshuffled", n, self.world, per, len(self), last, left,
                 ", and one more that would make a batch of one" if per != n // self.world else "")

    # ---- position -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The training loop's interface: its batch position, turned into a sample position here (the one place
        that assumes batches of `batch_size` on every one of `world_size` ranks)."""
        self.set_position(epoch, start_batch * self.batch_size * self.world)

    def set_position(self, epoch: int, samples_done: int = 0) -> None:
        """Start the next pass of `epoch` after `samples_done` samples of it (over all ranks): each rank skips that
        share of its own run, in whole batches."""
        self.epoch = epoch
        self.start_batch = min(len(self), samples_done // self.world // self.batch_size)

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)

    # ---- one pass --------------------------------------------------------------------------------
    def shard_order(self) -> list[int]:
        n = len(self.split.shards)
        if not self.train:
            return list(range(n))
        gen = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, "shards"))
        return torch.randperm(n, generator=gen).tolist()

    def _parts(self) -> tuple[list[tuple[int, int, int]], list[int], list[int]]:
        """Each worker's (begin, end, outputs to skip), the sizes of the batches to skip, and which worker makes
        each batch still to come, in yielded order."""
        workers = max(1, self.num_workers)
        blocks = worker_blocks(len(self), workers)
        order = batch_order(blocks)
        done = [0] * workers
        for k, _ in order[:self.start_batch]:
            done[k] += 1
        parts, bs = [], self.batch_size
        for k, (lo, hi) in enumerate(blocks):
            begin, end = self.begin + lo * bs, self.begin + min(hi * bs, self.count)
            parts.append((begin, max(begin, end), done[k] * bs))
        sizes = [min(bs, self.count - (blocks[k][0] + j) * bs) for k, j in order[:self.start_batch]]
        return parts, sizes, [k for k, _ in order[self.start_batch:]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device=self.device).manual_seed(stream_seed(self.seed, self.epoch, self.rank))
        parts, skipped, makers = self._parts()
        if self.transform is not None:
            for n in skipped:  # before the resume point: same draws, no pixels
                self.transform.skip(n, (self.size, self.size), gen)
        stream = _Stream(self.split, self.shard_order(), parts, self.batch_size, self.size, self.window,
                         (self.seed, self.epoch, self.rank), decode_here=not self.on_device)
        # a generator of its own: without one the DataLoader draws its workers' base seed from the global RNG, which
        # carries the dropout stream, and a resume (RNG restored from the checkpoint) would draw it at another point
        own = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, self.rank, "loader"))
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.on_device,
                            worker_init_fn=ignore_stop_signals if self.num_workers else None, generator=own)
        for batch, labels in self._in_order(loader, makers):
            squares = batch.to(self.device) if not self.on_device else self._on_device(batch)
            images = squares if self.transform is None else self.transform(squares, gen)
            yield images, labels.to(self.device, non_blocking=True)

    @staticmethod
    def _in_order(loader: DataLoader, makers: list[int]) -> Iterator[tuple[Any, torch.Tensor]]:
        """The workers' batches in the order of the uninterrupted pass (`makers`: the worker of each batch). The
        DataLoader's round robin always starts at worker 0, which after a resume is not the worker whose batch
        comes next; a batch that arrives early waits here (a few at most: the workers run in lockstep)."""
        waiting: dict[int, list[tuple[Any, torch.Tensor]]] = {}
        stream = iter(loader)
        for k in makers:
            while not waiting.get(k):
                worker, batch, labels = next(stream)
                waiting.setdefault(worker, []).append((batch, labels))
            yield waiting[k].pop(0)

    def _on_device(self, encoded: list[torch.Tensor]) -> torch.Tensor:
        """A batch's bytes decoded on the GPU (nvJPEG, batched); an image no decoder reads is replaced by another of
        the batch under --skip-bad-images, as the workers do on a CPU."""
        try:
            decoded = decode_batch(None, self.device, self.split.decoder, encoded=encoded)
        except BadImage:
            decoded = []
            for data in encoded:
                try:
                    decoded.extend(decode_batch(None, self.device, self.split.decoder, encoded=[data]))
                except BadImage as err:
                    if not self.split.skip_bad:
                        raise UserError(f"cannot decode an image of the shards ({err}): fix the shard, or pass "
                                        "--skip-bad-images to skip such images (counted)") from None
                    log.warning("--skip-bad-images: skipped an unreadable image (%s); another image of the batch "
                                "takes its place", err)
            if not decoded:
                raise UserError("no image of a batch can be decoded: the shards are damaged") from None
            decoded += [decoded[i % len(decoded)] for i in range(len(encoded) - len(decoded))]
        return torch.stack([eval_resize(img, self.size) for img in decoded])
