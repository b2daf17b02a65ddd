"""dtl.data.preprocessing: the one eval geometry (`eval_resize`) and the one eval transform, shared by the workers
loader, the image cache, the decode pipeline, predict and export."""

from __future__ import annotations

import pickle

import pytest
import torch
from torchvision.transforms import v2

from dtl.data.preprocessing import IMAGENET, EvalResize, Preprocessing, eval_resize, eval_transform, v2_interpolation


def test_eval_transform_resizes_the_shorter_side_then_crops_and_normalises():
    out = eval_transform(32)(torch.zeros(3, 40, 64, dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0, 0], -torch.tensor(IMAGENET.mean) / torch.tensor(IMAGENET.std))
    half = eval_transform(8, Preprocessing((0.5,) * 3, (0.5,) * 3))(torch.full((3, 8, 8), 255, dtype=torch.uint8))
    assert torch.equal(half, torch.ones(3, 8, 8))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_eval_resize_is_torchvisions_resize_and_center_crop(interpolation):
    """The one eval geometry, bitwise torchvision's v2 Resize(size) + CenterCrop(size) on uint8 (square, wide
    and tall sources, odd margins); `eval_transform` is it followed by ToDtype + Normalize."""
    mode = v2_interpolation(interpolation)
    reference = v2.Compose([v2.Resize(24, interpolation=mode, antialias=True), v2.CenterCrop(24)])
    prep = Preprocessing((0.5, 0.4, 0.3), (0.2, 0.3, 0.4), interpolation)
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)])
    g = torch.Generator().manual_seed(0)
    for hw in ((40, 40), (32, 53), (61, 30), (24, 24)):
        img = torch.randint(0, 256, (3, *hw), dtype=torch.uint8, generator=g)
        want = reference(img)
        assert torch.equal(eval_resize(img, 24, interpolation), want), hw
        assert torch.equal(EvalResize(24, interpolation)(img), want)
        assert torch.equal(eval_transform(24, prep)(img), normalise(want))
    assert pickle.loads(pickle.dumps(EvalResize(24, interpolation)))(img).shape == (3, 24, 24)  # DataLoader workers
