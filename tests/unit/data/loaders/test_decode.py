"""dtl.data.loaders.decode: the decode pipeline gives the cached device pipeline's batches without the cache, and
resumes on the same random stream."""

import torch

from dtl.data import folder, image_cache
from dtl.data.augment.transform import BatchTransform
from dtl.data.loaders import BatchLoader, DecodeLoader, DeviceLoader
from dtl.data.samplers import EvalShardSampler, train_sampler
from dtl.distributed import DistEnv
from tests.unit.data.test_folder import write_folder


def folder_of(tmp_path, per_class: int = 6):  # noqa: ANN201
    """A small image folder written under tmp_path, as one split."""
    write_folder(tmp_path / "images", per_class=per_class, bad=False)
    return folder.load_image_folder(tmp_path / "images")


def test_decode_pipeline_is_the_cached_device_pipeline_without_the_cache(tmp_path):
    """--data-pipeline decode: the same squares as the cache (workers decode and resize on a CPU) through the same
    batched transforms as the device pipeline over the cache; its random stream is per (seed, epoch, rank) and
    a resume replays the skipped batches' draws."""
    split = folder_of(tmp_path)
    cached = image_cache.cached_split(split, "train", tmp_path / "cache", 32, True)
    sampler = EvalShardSampler(len(split), 0, 1)
    device = DeviceLoader(cached, sampler, 4, BatchTransform(False, 24), torch.device("cpu"), seed=2, rank=0)
    decode = DecodeLoader(split, sampler, 4, BatchTransform(False, 24), 32, 1, torch.device("cpu"), seed=2, rank=0)
    for (x, y), (xd, yd) in zip(decode, device, strict=True):
        assert torch.equal(x, xd) and torch.equal(y, yd) and x.shape[1:] == (3, 24, 24)
    train = DecodeLoader(split, train_sampler(len(split), DistEnv(), seed=2), 4, BatchTransform(True, 24), 32, 0,
                         torch.device("cpu"), seed=2, rank=0)
    train.set_epoch(1)
    full = list(train)
    train.set_epoch(1, start_batch=3)
    resumed = list(train)
    assert len(full) == 5 and len(resumed) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, full[3:]))
    train.set_epoch(2)
    assert not torch.equal(next(iter(train))[0], full[0][0])  # reshuffled and redrawn per epoch
    assert isinstance(train, BatchLoader)
