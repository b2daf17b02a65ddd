"""dtl.data.loaders.workers: the per-image pipeline runs the uint8 chain on a batch of one, seeded per image."""

import torch

from dtl.config import Config
from dtl.data.cifar import make_synthetic
from dtl.data.loaders import build_loaders
from dtl.data.loaders.transforms import augment_chain
from dtl.data.splits import Splits, stream_seed
from dtl.distributed import DistEnv


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


def test_the_trainers_global_generator_is_untouched_with_no_workers():
    """--num-workers 0 transforms in the trainer's process: its dropout stream must not depend on the batch."""
    split = make_synthetic(6)
    cfg = Config(image_size=16, data_pipeline="workers", num_workers=0, crop="pad", auto_augment="ta_wide", seed=4)
    train, _ = build_loaders(cfg, Splits(split, split), DistEnv(), torch.device("cpu"), torch.float32)
    train.set_epoch(1)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = list(train)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(7)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, train))  # the images' own seeds still rule
