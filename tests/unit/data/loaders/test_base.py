"""dtl.data.loaders.base: every loader, image or feature, is a `BatchLoader` with the one `set_epoch` signature,
and a resume point skips the batches before it."""

import inspect

import torch

from dtl.data.augment.transform import BatchTransform
from dtl.data.cifar import make_synthetic
from dtl.data.features import CachedSplit, FeatureLoader
from dtl.data.loaders import BatchLoader, DeviceLoader, WorkerLoader
from dtl.data.loaders.transforms import v2_transform
from dtl.data.samplers import EvalShardSampler


def test_every_loader_is_a_batch_loader():
    split = make_synthetic(20)
    sampler = EvalShardSampler(len(split), 0, 1)
    loaders = [
        DeviceLoader(split, sampler, 8, BatchTransform(False, 32), torch.device("cpu"), seed=0, rank=0),
        WorkerLoader(split, sampler, 8, v2_transform(False, 32, False), 0, torch.device("cpu"), seed=0),
        FeatureLoader(CachedSplit(torch.randn(20, 5), split.labels), sampler, 8),
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
