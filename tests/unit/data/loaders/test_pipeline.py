"""dtl.data.loaders.pipeline: which pipeline a run takes and which transforms its loaders get."""

import torch

from dtl.config import Config
from dtl.data.augment.transform import BatchTransform
from dtl.data.cifar import make_synthetic
from dtl.data.loaders import WorkerLoader, build_loaders, resolve_pipeline
from dtl.data.loaders.transforms import augment_chain
from dtl.data.splits import Splits
from dtl.distributed import DistEnv


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


def test_auto_pipeline_for_folders_says_which():

    folder_cfg = Config(dataset="folder", mode="scratch")
    assert resolve_pipeline(folder_cfg) == "decode" and resolve_pipeline(Config()) == "device"
    assert resolve_pipeline(folder_cfg.replace(cache_images="auto")) == "device"
    assert resolve_pipeline(folder_cfg.replace(data_pipeline="workers")) == "workers"
