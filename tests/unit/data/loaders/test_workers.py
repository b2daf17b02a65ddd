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
