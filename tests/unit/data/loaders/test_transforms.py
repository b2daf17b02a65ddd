"""dtl.data.loaders.transforms: the workers pipeline evaluates (and trains without augmentation) with the one eval
transform."""

import torch

from dtl.data.cifar import make_synthetic
from dtl.data.loaders.transforms import v2_transform
from dtl.data.preprocessing import eval_transform


def test_the_loaders_evaluate_with_the_same_transform():
    img = make_synthetic(2).images[0]
    assert torch.equal(v2_transform(False, 48, False)(img), eval_transform(48)(img))
    assert torch.equal(v2_transform(True, 48, False)(img), eval_transform(48)(img))  # --no-augment training
