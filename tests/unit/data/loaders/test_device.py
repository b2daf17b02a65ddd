"""Loaders: the device pipeline's chunked batches and mid-epoch resume replay the same stream; every loader
is a `BatchLoader`."""

import inspect

import torch

from dtl.config import Config
from dtl.data.augment.chain import AugmentChain
from dtl.data.augment.transform import BatchTransform
from dtl.data.cifar import make_synthetic
from dtl.data.features import FeatureLoader
from dtl.data.loaders import BatchLoader, DeviceLoader, WorkerLoader, augment_chain, build_loaders, v2_transform
from dtl.data.samplers import EvalShardSampler, train_sampler
from dtl.data.splits import Splits, stream_seed
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


def test_every_loader_is_a_batch_loader():
    split = make_synthetic(20)
    sampler = EvalShardSampler(len(split), 0, 1)
    loaders = [
        DeviceLoader(split, sampler, 8, BatchTransform(False, 32), torch.device("cpu"), seed=0, rank=0),
        WorkerLoader(split, sampler, 8, v2_transform(False, 32, False), 0, torch.device("cpu"), seed=0),
        FeatureLoader(torch.randn(20, 5), split.labels, sampler, 8),
    ]
    want = inspect.signature(BatchLoader.set_epoch)
    for loader in loaders:
        assert isinstance(loader, BatchLoader)
        assert inspect.signature(type(loader).set_epoch) == want
        loader.set_epoch(0, start_batch=1)
        batches = list(loader)
        assert len(loader) == 3 and len(batches) == 2  # the batch before the resume point is skipped
        assert all(isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) for x, y in batches)
        assert torch.equal(torch.cat([y for _, y in batches]), split.labels[8:])


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


def test_defaults_keep_the_fused_transform_and_workers_use_the_same_chain():
    """Off by default (the fused BatchTransform, no chain); on, the workers pipeline runs the chain per image,
    seeded per (seed, epoch, index), so a batch does not depend on the worker or the resume point."""
    splits = Splits(make_synthetic(24), make_synthetic(8))
    train, _ = build_loaders(Config(image_size=32, crop_scale=(0.3, 1.0)), splits, DistEnv(), torch.device("cpu"),
                             torch.float32)
    assert isinstance(train.transform, BatchTransform) and train.transform.scale == (0.3, 1.0)
    assert augment_chain(Config()) is None
    cfg = Config(image_size=16, data_pipeline="workers", num_workers=0, auto_augment="augmix", batch_size=8)
    train, _ = build_loaders(cfg, splits, DistEnv(), torch.device("cpu"), torch.float32)
    assert isinstance(train, WorkerLoader)
    train.set_epoch(1)
    first = list(train)
    train.set_epoch(1, start_batch=2)
    (x, y), = list(train)
    assert x.shape == (8, 3, 16, 16) and torch.equal(x, first[2][0]) and torch.equal(y, first[2][1])


def test_workers_path_is_the_chain_on_a_batch_of_one_seeded_per_image():
    """Image folders: each image goes through the same AugmentChain code, seeded per (seed, epoch, index)."""
    split = make_synthetic(6)
    cfg = Config(image_size=16, data_pipeline="workers", num_workers=0, crop="pad", auto_augment="ta_wide",
                 random_erasing=0.5, seed=4)
    train, _ = build_loaders(cfg, Splits(split, split), DistEnv(), torch.device("cpu"), torch.float32)
    train.set_epoch(2)
    dataset, chain = train.dataset, augment_chain(cfg, channels_last=False)
    dataset.epoch = 2
    for i in range(len(split)):
        gen = torch.Generator().manual_seed(stream_seed(4, 2, i))
        assert torch.equal(dataset[i][0], chain(split.images[i:i + 1], gen)[0]), i


# ---- image folders: the decode pipeline and the kept evaluation --------------------------------------------

def _folder(tmp_path, per_class: int = 6):  # noqa: ANN202
    from dtl.data import folder
    from tests.unit.data.test_folder import write_folder

    write_folder(tmp_path / "images", per_class=per_class, bad=False)
    return folder.load_image_folder(tmp_path / "images")


def test_decode_pipeline_is_the_cached_device_pipeline_without_the_cache(tmp_path):
    """--data-pipeline decode: the same squares as the cache (workers decode and resize on a CPU) through the same
    batched transforms as the device pipeline over the cache; its random stream is per (seed, epoch, rank) and
    a resume replays the skipped batches' draws."""
    from dtl.data import image_cache
    from dtl.data.loaders import DecodeLoader

    split = _folder(tmp_path)
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


def test_folder_evaluation_decodes_once_and_gives_the_files_numbers(tmp_path, monkeypatch):
    """Without a cache, the evaluation split's decoded images are kept after the first pass (within
    --eval-memory-mib): the second pass reads no file, and both are bitwise the per-image eval transform's."""
    from dtl.data import folder_split, loaders

    split = _folder(tmp_path)
    cfg = Config(dataset="folder", data_dir=str(tmp_path / "images"), image_size=24, batch_size=5, num_workers=0,
                 mode="scratch", data_pipeline="workers")
    reads = []
    real = folder_split.decode
    monkeypatch.setattr(folder_split, "decode", lambda path, decoder="auto": reads.append(path) or real(path, decoder))
    kept = loaders.eval_loader(cfg, split, DistEnv(), torch.device("cpu"))
    assert isinstance(kept, loaders.KeptEvalLoader)
    plain = loaders.eval_loader(cfg.replace(eval_memory_mib=0), split, DistEnv(), torch.device("cpu"))
    assert isinstance(plain, WorkerLoader)
    want = list(plain)
    reads.clear()
    for n_reads in (len(split), 0):  # the first pass decodes every file, the second none
        kept.set_epoch(0)
        got = list(kept)
        assert len(reads) == n_reads
        reads.clear()
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want, strict=True))
        assert got[0][0].is_contiguous(memory_format=torch.channels_last)
    tiny = cfg.replace(eval_memory_mib=len(split) * 3 * 24 * 24 / 2**20 * 0.99)  # just does not fit
    assert isinstance(loaders.eval_loader(tiny, split, DistEnv(), torch.device("cpu")), WorkerLoader)
    # the decode pipeline keeps its squares the same way (and gives the files' numbers too, to float rounding)
    decode = loaders.eval_loader(cfg.replace(data_pipeline="decode"), split, DistEnv(), torch.device("cpu"))
    assert isinstance(decode, loaders.KeptEvalLoader) and isinstance(decode.inner, loaders.DecodeLoader)
    for _ in range(2):
        decode.set_epoch(0)
        got = list(decode)
        assert all(torch.allclose(a[0], b[0], atol=1e-5) and torch.equal(a[1], b[1])
                   for a, b in zip(got, want, strict=True))
    assert len(reads) == len(split)  # decoded by the first pass only


def test_auto_pipeline_for_folders_says_which():
    from dtl.data.loaders import resolve_pipeline

    folder_cfg = Config(dataset="folder", mode="scratch")
    assert resolve_pipeline(folder_cfg) == "decode" and resolve_pipeline(Config()) == "device"
    assert resolve_pipeline(folder_cfg.replace(cache_images="auto")) == "device"
    assert resolve_pipeline(folder_cfg.replace(data_pipeline="workers")) == "workers"
