"""dtl.data.augment.erasing: box sizes follow torchvision's RandomErasing (KS), erased pixels hold the stated
value and the rest of the image is untouched."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from dtl.data.augment.erasing import erase, sample_erasing, sample_noise
from tests.unit.data.augment.test_boxes import ks_critical_value, ks_statistic

H, W, N = 24, 32, 20_000


def torchvision_boxes(n: int, seed: int) -> torch.Tensor:
    """(h, w) of the boxes v2.RandomErasing(p=1) picks for a 3 x H x W image (fallbacks, which erase nothing,
    left out)."""
    tv = v2.RandomErasing(p=1.0)
    img = torch.zeros(3, H, W)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(n):
            p = tv.make_params([img])
            if p["v"] is not None:
                out.append((p["i"], p["j"], p["h"], p["w"]))
    return torch.tensor(out, dtype=torch.float64)


def features(boxes: torch.Tensor) -> list[torch.Tensor]:
    top, left, h, w = boxes.double().unbind(dim=1)
    return [h * w / (H * W), torch.log(h / w), (top + h / 2) / H, (left + w / 2) / W]


def test_area_and_aspect_distribution_match_torchvision() -> None:
    ours = sample_erasing(N, H, W, 1.0, torch.Generator().manual_seed(0))
    ours = ours[ours[:, 2] > 0]
    ref = torchvision_boxes(N, seed=1)
    crit = ks_critical_value(len(ours), len(ref))
    assert len(ours) > 0.9 * N and abs(len(ours) - len(ref)) < 0.01 * N  # the fallback rate agrees too
    for a, b in zip(features(ours), features(ref)):
        assert ks_statistic(a, b) < crit
    # ... and the check can fail: torchvision's boxes against boxes with a wrong scale range
    wrong = sample_erasing(N, H, W, 1.0, torch.Generator().manual_seed(0), scale=(0.02, 0.2))
    assert ks_statistic(features(wrong[wrong[:, 2] > 0])[0], features(ref)[0]) > crit


def test_probability_and_box_bounds() -> None:
    boxes = sample_erasing(N, H, W, 0.25, torch.Generator().manual_seed(2))
    erased = boxes[:, 2] > 0
    assert abs(erased.double().mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / N)
    top, left, h, w = boxes[erased].unbind(dim=1)
    assert (h < H).all() and (w < W).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()


def test_erased_pixels_hold_the_value_and_others_are_untouched() -> None:
    x = torch.randn(64, 3, H, W) + 5  # never 0
    boxes = sample_erasing(64, H, W, 0.5, torch.Generator().manual_seed(3))
    noise = sample_noise(64, 3, H, W, torch.Generator().manual_seed(4))
    for fill in (None, noise):
        out = erase(x, boxes, fill)
        for i, (top, left, h, w) in enumerate(boxes.tolist()):
            inside = torch.zeros(H, W, dtype=torch.bool)
            inside[top:top + h, left:left + w] = True
            expected = torch.zeros(3, h, w) if fill is None else fill[i, :, top:top + h, left:left + w]
            assert torch.equal(out[i][:, inside].view(3, h, w), expected)
            assert torch.equal(out[i][:, ~inside], x[i][:, ~inside])
