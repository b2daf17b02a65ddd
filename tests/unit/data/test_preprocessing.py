"""dtl.data.preprocessing: the one eval transform, shared by the workers loader, predict and export."""

from __future__ import annotations

import torch

from dtl.data.cifar import make_synthetic
from dtl.data.loaders import v2_transform
from dtl.data.preprocessing import IMAGENET, Preprocessing, eval_transform


def test_eval_transform_resizes_the_shorter_side_then_crops_and_normalises():
    out = eval_transform(32)(torch.zeros(3, 40, 64, dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0, 0], -torch.tensor(IMAGENET.mean) / torch.tensor(IMAGENET.std))
    half = eval_transform(8, Preprocessing((0.5,) * 3, (0.5,) * 3))(torch.full((3, 8, 8), 255, dtype=torch.uint8))
    assert torch.equal(half, torch.ones(3, 8, 8))


def test_the_loaders_evaluate_with_the_same_transform():
    img = make_synthetic(2).images[0]
    assert torch.equal(v2_transform(False, 48, False)(img), eval_transform(48)(img))
    assert torch.equal(v2_transform(True, 48, False)(img), eval_transform(48)(img))  # --no-augment training
