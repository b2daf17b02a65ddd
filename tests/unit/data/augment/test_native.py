"""dtl.data.augment.native: large sources on a CPU take torch's native antialiased kernel, with the batched
matmuls' results."""

from __future__ import annotations

import torch

from dtl.data.augment import native
from dtl.data.augment.boxes import sample_crop_boxes, sample_flips
from dtl.data.augment.transform import resize_center_crop, resized_crop
from tests.unit.data.augment.test_transform import random_images


def test_large_sources_on_a_cpu_take_the_native_kernel_with_the_matmuls_results(monkeypatch) -> None:
    """Sources of NATIVE_MIN_SIDE px or more are resampled per image by F.interpolate on a CPU (5x faster at
    224 px); it computes the same weights, so the results agree with the batched matmuls to float rounding."""
    g = torch.Generator().manual_seed(3)
    images = random_images(12, 96, 120, seed=3)
    boxes, flips = sample_crop_boxes(12, 96, 120, generator=g), sample_flips(12, generator=g)
    by_kernel, by_kernel_resize = resized_crop(images, boxes, 80, flips), resize_center_crop(images, 80)
    monkeypatch.setattr(native, "NATIVE_MIN_SIDE", 10**9)
    matmul, matmul_resize = resized_crop(images, boxes, 80, flips), resize_center_crop(images, 80)
    torch.testing.assert_close(by_kernel, matmul, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_kernel_resize, matmul_resize, atol=1e-5, rtol=0)
    assert by_kernel.is_contiguous(memory_format=torch.channels_last)
