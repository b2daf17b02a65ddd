"""`dtl.data.loaders.webdataset.ShardLoader`, every rank of a world simulated in one process: an equal number of
batches on every rank (the remainder rule), disjoint training shares that reshuffle per epoch, an evaluation that
reads every sample exactly once at any world size, and a mid-epoch resume that continues with exactly the samples
the uninterrupted pass had left (same world size and workers)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from dtl.data.loaders.webdataset import ShardLoader, batch_order, rank_share, worker_blocks
from dtl.data.webdataset import Shard, ShardSplit

wds = pytest.importorskip("webdataset")

N, PER_SHARD = 45, 7


def write_split(folder: Path) -> ShardSplit:
    """N samples in shards of PER_SHARD: sample g is an 8x8 PNG whose pixel (0, 0) holds (g, g // 256, 0)."""
    from PIL import Image

    folder.mkdir()
    shards = []
    for s in range(0, N, PER_SHARD):
        url = str(folder / f"train-{s // PER_SHARD:06d}.tar")
        labels = []
        with wds.TarWriter(url) as w:
            for g in range(s, min(s + PER_SHARD, N)):
                img = Image.new("RGB", (8, 8), (g % 256, g // 256, 0))
                buf = io.BytesIO()
                img.save(buf, "PNG")
                w.write({"__key__": f"{g:06d}", "png": buf.getvalue(), "cls": str(g % 3).encode()})
                labels.append(g % 3)
        shards.append(Shard(url, tuple(labels)))
    return ShardSplit(shards, ["a", "b", "c"], "test shards")


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> ShardSplit:
    return write_split(tmp_path_factory.mktemp("wds") / "shards")


def ids(loader: ShardLoader) -> list[list[int]]:
    """The sample numbers of each batch of one pass (from the pixels: transform None yields the uint8 squares)."""
    return [[int(x[0, 0, 0]) + 256 * int(x[1, 0, 0]) for x in images] for images, _ in loader]


def make(split: ShardSplit, rank: int, world: int, train: bool = True, workers: int = 0, batch: int = 4,
         buffer: int = 5) -> ShardLoader:
    return ShardLoader(split, batch, None, 8, workers, torch.device("cpu"), seed=3, rank=rank, world_size=world,
                       train=train, shuffle_buffer=buffer)


def test_the_remainder_rule():
    assert rank_share(45, 2, 4) == 22 and rank_share(45, 4, 4) == 11
    assert rank_share(45, 2, 21) == 21  # 22 would end in a batch of one image
    assert worker_blocks(6, 2) == [(0, 3), (3, 6)] and worker_blocks(5, 2) == [(0, 2), (2, 5)]
    assert batch_order([(0, 2), (2, 5)]) == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_has_the_same_batches_and_the_shares_are_disjoint(split, world):
    loaders = [make(split, r, world) for r in range(world)]
    passes = [ids(lo) for lo in loaders]
    assert len({len(lo) for lo in loaders}) == 1 and all(len(p) == len(loaders[0]) for p in passes)
    seen = [g for p in passes for b in p for g in b]
    assert len(seen) == len(set(seen)) == world * rank_share(N, world, 4)
    for lo in loaders:
        lo.set_epoch(1)
    again = [g for lo in loaders for b in ids(lo) for g in b]
    assert again != seen and len(again) == len(seen)  # the shard order and the windows reshuffle per epoch


@pytest.mark.parametrize("world", [1, 2, 4])
def test_evaluation_reads_every_sample_exactly_once(split, world):
    seen = [g for r in range(world) for b in ids(make(split, r, world, train=False)) for g in b]
    assert seen == list(range(N))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mid_epoch_resume_continues_with_the_samples_left(split, workers):
    """At the same world size and workers: the batches after the resume point are those of the whole pass."""
    full = make(split, 1, 2, workers=workers)
    full.set_epoch(2)
    whole = ids(full)
    assert sorted(g for b in whole for g in b) != list(range(22))  # shuffled
    for start in (1, 3, len(whole) - 1):
        resumed = make(split, 1, 2, workers=workers)
        resumed.set_epoch(2, start_batch=start)
        assert ids(resumed) == whole[start:]


def test_position_in_samples_and_another_world_size(split):
    """`set_position` takes samples consumed over all ranks; another world size keeps the number of batches
    left (not exactly the samples)."""
    a = make(split, 0, 2)
    a.set_position(0, samples_done=2 * 4 * 2)  # two batches of 4 on each of 2 ranks
    full = make(split, 0, 2)
    assert ids(a) == ids(full)[2:]
    one = make(split, 0, 1)
    one.set_position(0, samples_done=16)
    assert len(ids(one)) == len(one) - 4
