"""dtl.data.augment.boxes: RandomResizedCrop's boxes and the flips, compared with torchvision's
``RandomResizedCrop.get_params`` in distribution (two-sample Kolmogorov-Smirnov tests), since the random streams
differ by design. The KS helpers here serve the other augmentation tests too."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms as T

from dtl.data.augment.boxes import sample_crop_boxes, sample_flips

SCALE = (0.5, 1.0)
RATIO = (3 / 4, 4 / 3)

# Significance level of every KS test below. Each test run uses fixed seeds, so the outcome is
# deterministic; alpha only says how unusual a sample would have to be to flag a real mismatch.
KS_ALPHA = 1e-3


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic ``sup_x |F_a(x) - F_b(x)|`` (ties handled exactly)."""
    a, _ = torch.sort(a.double().flatten())
    b, _ = torch.sort(b.double().flatten())
    grid = torch.unique(torch.cat([a, b]))
    cdf_a = torch.searchsorted(a, grid, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return (cdf_a - cdf_b).abs().max().item()


def ks_critical_value(n: int, m: int, alpha: float = KS_ALPHA) -> float:
    """Asymptotic critical value: reject equality when D > c(alpha) sqrt((n + m) / (n m)).

    ``c(alpha) = sqrt(-ln(alpha / 2) / 2)`` (1.949 for alpha = 0.001). For discrete distributions, as
    here (integer box sizes), the test is conservative, i.e. it rejects equal distributions even less
    often than alpha.
    """
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def box_features(boxes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    top, left, h, w = boxes.double().unbind(dim=1)
    return {
        "area_fraction": h * w / (height * width),
        "log_aspect": torch.log(w / h),
        "centre_y": (top + h / 2) / height,
        "centre_x": (left + w / 2) / width,
    }


def torchvision_boxes(n: int, height: int, width: int, seed: int, scale=SCALE, ratio=RATIO) -> torch.Tensor:
    """``n`` boxes from torchvision's own sampler (uses the global RNG, so isolate it)."""
    img = torch.empty(3, height, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        boxes = [T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)]
    return torch.tensor(boxes, dtype=torch.int64)


def max_ks_ratio(ours: torch.Tensor, ref: torch.Tensor, height: int, width: int) -> float:
    """Largest KS statistic over the box features, divided by the critical value (> 1 means reject)."""
    crit = ks_critical_value(len(ours), len(ref))
    f_ours, f_ref = box_features(ours, height, width), box_features(ref, height, width)
    return max(ks_statistic(f_ours[k], f_ref[k]) / crit for k in f_ours)


@pytest.fixture(scope="module")
def tv_boxes_32() -> torch.Tensor:
    return torchvision_boxes(10_000, 32, 32, seed=1)


def test_boxes_are_valid_and_deterministic() -> None:
    boxes = sample_crop_boxes(5000, 32, 24, generator=torch.Generator().manual_seed(0))
    assert boxes.shape == (5000, 4) and boxes.dtype == torch.int64
    top, left, h, w = boxes.unbind(dim=1)
    assert (h > 0).all() and (w > 0).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 24).all()
    again = sample_crop_boxes(5000, 32, 24, generator=torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)


def test_box_distribution_matches_torchvision(tv_boxes_32: torch.Tensor) -> None:
    ours = sample_crop_boxes(20_000, 32, 32, SCALE, RATIO, generator=torch.Generator().manual_seed(2))
    crit = ks_critical_value(len(ours), len(tv_boxes_32))
    f_ours, f_ref = box_features(ours, 32, 32), box_features(tv_boxes_32, 32, 32)
    for name in f_ours:
        d = ks_statistic(f_ours[name], f_ref[name])
        assert d <= crit, f"{name}: KS statistic {d:.4f} > critical value {crit:.4f} (alpha={KS_ALPHA})"


@pytest.mark.parametrize(
    ("scale", "ratio"),
    [((0.3, 1.0), RATIO), ((0.5, 0.9), RATIO), (SCALE, (1 / 2, 2.0))],
    ids=["scale-too-wide", "scale-too-small", "ratio-too-wide"],
)
def test_ks_detects_wrong_parameters(tv_boxes_32: torch.Tensor, scale, ratio) -> None:
    # The comparison above is only meaningful if it can fail: boxes drawn with the wrong scale or ratio
    # range must be rejected against torchvision's defaults.
    wrong = sample_crop_boxes(20_000, 32, 32, scale, ratio, generator=torch.Generator().manual_seed(3))
    assert max_ks_ratio(wrong, tv_boxes_32, 32, 32) > 1.0


def test_fallback_always_taken_matches_torchvision() -> None:
    # 8 x 64: every attempt needs h >= sqrt(256 / (4/3)) > 8, so all boxes are torchvision's fallback
    # (full height, width clamped to the max ratio, centred), which is deterministic.
    ours = sample_crop_boxes(500, 8, 64, generator=torch.Generator().manual_seed(0))
    ref = torchvision_boxes(200, 8, 64, seed=0)
    assert torch.equal(ref, ref[:1].expand_as(ref))
    assert torch.equal(ours, ref[:1].expand_as(ours))
    # Same for a tall image (ratio clamped to the min ratio).
    ours_tall = sample_crop_boxes(100, 64, 8, generator=torch.Generator().manual_seed(0))
    ref_tall = torchvision_boxes(20, 64, 8, seed=0)
    assert torch.equal(ours_tall, ref_tall[:1].expand_as(ours_tall))


def test_fallback_sometimes_taken_matches_torchvision() -> None:
    # 20 x 40: about a third of the images exhaust the 10 attempts and get the central fallback box, the
    # rest are random; both the mixture weight and the random part must match.
    ref = torchvision_boxes(4000, 20, 40, seed=4)
    ours = sample_crop_boxes(20_000, 20, 40, generator=torch.Generator().manual_seed(5))
    fallback = torch.tensor([0, 6, 20, 27])  # top=(20-20)//2, left=(40-27)//2, h=20, w=round(20*4/3)
    frac_ref = (ref == fallback).all(dim=1).double().mean().item()
    frac_ours = (ours == fallback).all(dim=1).double().mean().item()
    assert 0.1 < frac_ref < 0.9  # the case really mixes both branches
    assert max_ks_ratio(ours, ref, 20, 40) <= 1.0
    # Mixture weight: two-proportion z-test at the same alpha (|z| <= 3.29).
    pooled = (frac_ref * len(ref) + frac_ours * len(ours)) / (len(ref) + len(ours))
    se = math.sqrt(pooled * (1 - pooled) * (1 / len(ref) + 1 / len(ours)))
    assert abs(frac_ref - frac_ours) / se <= 3.29


def test_flips_are_fair() -> None:
    flips = sample_flips(20_000, generator=torch.Generator().manual_seed(0))
    assert flips.dtype == torch.bool and flips.shape == (20_000,)
    # Binomial(20000, 0.5): sd = 70.7; 5 sd is essentially never exceeded by a fair coin.
    assert abs(flips.sum().item() - 10_000) < 5 * 70.7
