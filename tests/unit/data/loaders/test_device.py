"""dtl.data.loaders.device: the device pipeline's chunked batches and mid-epoch resume replay the same stream,
with the fused transform and with the uint8 chain."""

import torch

from dtl.config import Config
from dtl.data.augment.chain import AugmentChain
from dtl.data.augment.transform import BatchTransform
from dtl.data.cifar import make_synthetic
from dtl.data.loaders import DeviceLoader
from dtl.data.loaders.transforms import augment_chain
from dtl.data.samplers import train_sampler
from dtl.distributed import DistEnv


def batches(start_batch: int, size: int = 32, batch: int = 8, transform=None):  # noqa: ANN001
    split = make_synthetic(200)
    loader = DeviceLoader(split, train_sampler(len(split), DistEnv(), seed=3), batch,
                          transform or BatchTransform(True, size), torch.device("cpu"), seed=3, rank=0)
    loader.set_epoch(1, start_batch)
    return list(loader), loader


def test_resume_mid_chunk_yields_the_same_batches():
    full, loader = batches(0, size=96)
    assert 1 < loader.chunk_batches < 25 and len(full) == 25  # 200 images / 8: several chunks of batches
    for start in (1, loader.chunk_batches, loader.chunk_batches + 3, 24):
        resumed, _ = batches(start, size=96)
        assert len(resumed) == len(full) - start
        for (x, y), (x_full, y_full) in zip(resumed, full[start:], strict=True):
            assert torch.equal(x, x_full) and torch.equal(y, y_full)


def test_batches_are_channels_last_and_the_last_one_is_short():
    full, _ = batches(0, size=64, batch=16)
    assert full[0][0].shape == (16, 3, 64, 64) and full[0][0].is_contiguous(memory_format=torch.channels_last)
    assert full[-1][0].shape[0] == 200 - 16 * 12


def test_resume_with_auto_augment_erasing_and_pad_crop_yields_the_same_batches():
    """The loader-level resume guarantee with the uint8 chain on: batches k.. of a resumed pass are exactly
    batches k.. of the full pass (skip() replays crop, flip, TA, erasing draws)."""
    cfg = Config(image_size=96, crop="pad", auto_augment="ta_wide", random_erasing=0.5, random_erasing_value="random")
    chain = augment_chain(cfg)
    assert isinstance(chain, AugmentChain)
    full, loader = batches(0, transform=chain)
    assert 1 < loader.chunk_batches < 25 and len(full) == 25  # several chunks: a resume skip()s some
    for start in (1, loader.chunk_batches, loader.chunk_batches + 3, 24):
        resumed, _ = batches(start, transform=augment_chain(cfg))
        assert len(resumed) == len(full) - start
        for (x, y), (x_full, y_full) in zip(resumed, full[start:], strict=True):
            assert torch.equal(x, x_full) and torch.equal(y, y_full)
