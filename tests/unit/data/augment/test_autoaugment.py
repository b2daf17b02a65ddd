"""dtl.data.augment.autoaugment: every op of TrivialAugmentWide, RandAugment and AugMix equals torchvision's v2
functional applied per image (integer-exact on uint8), the draws follow torchvision's op/magnitude choice (KS),
and AugMix given the same draws is within one grey level of torchvision's mixing."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dtl.data.augment.autoaugment import AutoAugment, apply_slots, equalize, fma, slot_table
from tests.unit.data.augment.test_boxes import ks_critical_value, ks_statistic

TV = {"ta_wide": v2.TrivialAugmentWide, "randaugment": v2.RandAugment, "augmix": v2.AugMix}
N_DRAWS = 20_000


def edge_images(size: int, seed: int = 0) -> torch.Tensor:
    """Random images plus the edge cases: a constant image, one with three grey levels, one with all 256."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8, generator=g)
    imgs[0] = 77
    imgs[1] = torch.randint(100, 103, (3, size, size), dtype=torch.uint8, generator=g)
    imgs[2].view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    imgs[3, 1] = 0  # one flat channel
    return imgs


@pytest.mark.parametrize(("policy", "size", "kwargs"), [
    ("ta_wide", 32, {}), ("ta_wide", 19, {}), ("randaugment", 32, {}), ("randaugment", 24, {"magnitude": 30}),
    ("randaugment", 24, {"magnitude": 0}), ("augmix", 32, {"severity": 10})])
def test_every_op_and_magnitude_matches_torchvision(policy: str, size: int, kwargs: dict) -> None:
    """Each slot (op, magnitude bin incl. the extremes, sign) on a batch: the batched result equals
    torchvision's own `_apply_image_or_video_transform` (the v2 functional call TA/RA/AugMix make) per image,
    bit for bit. Covers posterize 8..0 bits, solarize thresholds 255..0, rotate by 0/90/135, equalize and
    autocontrast on flat images."""
    aa = AutoAugment(policy, **kwargs)
    tv = TV[policy](**kwargs)
    table = aa.table(size, size, torch.device("cpu"))
    imgs = edge_images(size)
    keep = {0, 1, 15, 20, 29, 30} if policy == "ta_wide" else set(range(aa.num_bins))
    mismatches = []
    for s in range(len(table.magnitude)):
        if aa.bins[(s // 2) % len(aa.bins)] not in keep:
            continue
        op, mag = table.ops[int(table.op[s])], table.magnitude[s]
        ours = apply_slots(imgs, torch.full((len(imgs),), s), table, aa.mode)
        for i, img in enumerate(imgs):
            ref = tv._apply_image_or_video_transform(img, op, mag, interpolation=tv.interpolation, fill=tv._fill)
            if not torch.equal(ours[i], ref):
                mismatches.append((op, mag, i, int((ours[i] != ref).sum())))
    assert mismatches == []


def test_mixed_ops_in_one_batch_match_per_image() -> None:
    """Different ops per image in one call (the grouping puts every image back in its place)."""
    aa = AutoAugment("ta_wide")
    imgs = edge_images(16).repeat(8, 1, 1, 1)
    draws = aa.draw(len(imgs), (16, 16), torch.Generator().manual_seed(3), torch.device("cpu"))
    ours = aa.apply(imgs, draws)
    table, tv = aa.table(16, 16, torch.device("cpu")), v2.TrivialAugmentWide()
    for i, s in enumerate(draws.slots[:, 0].tolist()):
        op, mag = table.ops[int(table.op[s])], table.magnitude[s]
        assert torch.equal(ours[i], tv._apply_image_or_video_transform(imgs[i], op, mag, "nearest", tv._fill)), op


def test_equalize_edge_cases_match_torchvision() -> None:
    imgs = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    imgs[1] = 255
    imgs[2, :, :4] = 10  # two values
    imgs[3].view(-1)[:5] = 200  # one rare value
    imgs[4] = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    imgs[5] = torch.arange(64, dtype=torch.uint8).view(8, 8) * 4
    ours = equalize(imgs)
    for i in range(len(imgs)):
        assert torch.equal(ours[i], F.equalize(imgs[i])), i


def test_slot_magnitudes_are_torchvisions() -> None:
    """The magnitude table per op equals torchvision's `_AUGMENTATION_SPACE` (signs included)."""
    for policy, bins, size in (("ta_wide", 31, (32, 32)), ("randaugment", 31, (20, 28)), ("augmix", 10, (20, 28))):
        aa = AutoAugment(policy, severity=10) if policy == "augmix" else AutoAugment(policy)
        table = slot_table(policy, *size, aa.bins, bins, torch.device("cpu"))
        space = TV[policy]._AUGMENTATION_SPACE
        assert table.ops == tuple(space)
        for s, mag in enumerate(table.magnitude):
            op = table.ops[int(table.op[s])]
            fn, signed = space[op]
            values = fn(bins, *size)
            expected = 0.0 if values is None else float(values[aa.bins[(s // 2) % len(aa.bins)]])
            assert mag == (-expected if signed and s % 2 else expected), (policy, op, s)


def torchvision_choices(policy: str, n_calls: int, seed: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(op index, magnitude) of every op torchvision's transform chooses in `n_calls` calls (ops not applied)."""
    chosen: list[tuple[int, float]] = []
    tv = TV[policy](**kwargs)
    names = list(tv._AUGMENTATION_SPACE)

    def record(image, transform_id, magnitude, interpolation, fill):  # noqa: ANN001, ANN202
        chosen.append((names.index(transform_id), magnitude))
        return image

    tv._apply_image_or_video_transform = record
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(n_calls):
            tv(img)
    ops, mags = zip(*chosen)
    return torch.tensor(ops, dtype=torch.float64), torch.tensor(mags, dtype=torch.float64)


def our_choices(policy: str, n: int, seed: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    aa = AutoAugment(policy, **kwargs)
    table = aa.table(32, 32, torch.device("cpu"))
    slots = aa.draw(n, (32, 32), torch.Generator().manual_seed(seed), torch.device("cpu")).slots.flatten()
    mags = torch.tensor(table.magnitude, dtype=torch.float64)
    return table.op[slots].double(), mags[slots]


def max_ks_ratio(ours: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> float:
    crit = ks_critical_value(len(ours[0]), len(ref[0]))
    return max(ks_statistic(a, b) / crit for a, b in zip(ours, ref))


@pytest.mark.parametrize(("policy", "kwargs", "calls"), [("ta_wide", {}, N_DRAWS),
                                                          ("randaugment", {}, N_DRAWS // 2),
                                                          ("randaugment", {"num_ops": 1, "magnitude": 14}, N_DRAWS)])
def test_op_and_magnitude_distribution_matches_torchvision(policy: str, kwargs: dict, calls: int) -> None:
    """Two-sample KS at alpha 0.001 on the op index and the signed magnitude (>= 20,000 choices per side)."""
    ours = our_choices(policy, calls, seed=1, **kwargs)
    ref = torchvision_choices(policy, calls, seed=2, **kwargs)
    assert len(ref[0]) >= N_DRAWS and len(ours[0]) == len(ref[0])
    assert max_ks_ratio(ours, ref) < 1


def test_ks_detects_a_wrong_magnitude() -> None:
    ours = our_choices("randaugment", N_DRAWS // 2, seed=1, magnitude=7)
    ref = torchvision_choices("randaugment", N_DRAWS // 2, seed=2, magnitude=9)
    assert max_ks_ratio(ours, ref) > 1


def test_draws_do_not_depend_on_pixels_and_replay() -> None:
    """Same generator state after drawing for a batch, whatever policy: `draw` is what skip() replays."""
    for policy in ("ta_wide", "randaugment", "augmix"):
        aa = AutoAugment(policy)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        out = aa(edge_images(16), g1)
        aa.draw(5, (16, 16), g2, torch.device("cpu"))
        assert torch.equal(g1.get_state(), g2.get_state()) and out.dtype == torch.uint8


def test_augmix_matches_torchvision_given_the_same_draws() -> None:
    """AugMix's mixing: ours vs torchvision's formula (m0 x + sum w_i chain_i(x), truncated to uint8) with our
    Dirichlet weights and op chains fed to torchvision's own ops. Tolerance: one grey level (float32 sums that
    land next to an integer may truncate differently); observed: equal."""
    aa, tv = AutoAugment("augmix"), v2.AugMix()
    imgs = edge_images(24).repeat(2, 1, 1, 1)
    draws = aa.draw(len(imgs), (24, 24), torch.Generator().manual_seed(7), torch.device("cpu"))
    ours = aa.apply(imgs, draws)
    table = aa.table(24, 24, torch.device("cpu"))
    for i, img in enumerate(imgs):
        mix = draws.mix[i, 0] * img
        for c in range(aa.width):
            aug = img
            for s in draws.slots[i, c].tolist():
                if s >= 0:
                    op, mag = table.ops[int(table.op[s])], table.magnitude[s]
                    aug = tv._apply_image_or_video_transform(aug, op, mag, tv.interpolation, tv._fill)
            mix.add_(draws.mix[i, 1 + c] * aug)
        ref = mix.to(torch.uint8)
        assert (ours[i].int() - ref.int()).abs().max() <= 1, i
    assert torch.allclose(draws.mix.sum(dim=1), torch.ones(len(imgs)))
    depth = (draws.slots >= 0).sum(dim=2)
    assert depth.min() >= 1 and depth.max() <= 3


@pytest.mark.parametrize("shape", [(3, 17, 19), (2, 3, 5, 7), (1, 3, 224, 224)])
def test_fma_is_rounded_once(shape: tuple[int, ...]) -> None:
    """`fma` (float32 addcmul with a per-image alpha) equals y + alpha x computed exactly (float64: the product
    of two float32 numbers is exact there) and rounded once -- what torchvision's add_(alpha=) gives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, shape, generator=g).float()
    y = torch.rand(shape, generator=g) * 300
    alpha = (torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=g) * 2 - 1).float()
    exact = torch.addcmul(y.double(), x.double(), alpha.double()).float()
    assert torch.equal(fma(x, alpha, y), exact)
    first = y[0].clone().add_(x[0], alpha=float(alpha.flatten()[0]))  # torch's own scalar-alpha add_
    assert torch.equal(first, exact[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["ta_wide", "augmix"])
def test_every_op_matches_torchvision_on_cuda(policy: str) -> None:
    """The same per-slot comparison on the GPU (torchvision's ops on CUDA tensors as the reference)."""
    dev = torch.device("cuda")
    aa, tv = AutoAugment(policy), TV[policy]()
    table = aa.table(32, 32, dev)
    imgs = edge_images(32).to(dev)
    for s in range(len(table.magnitude)):
        op, mag = table.ops[int(table.op[s])], table.magnitude[s]
        ours = apply_slots(imgs, torch.full((len(imgs),), s, device=dev), table, aa.mode)
        for i, img in enumerate(imgs):
            ref = tv._apply_image_or_video_transform(img, op, mag, interpolation=tv.interpolation, fill=tv._fill)
            assert torch.equal(ours[i], ref), (op, mag, i)


def test_every_op_is_the_same_on_channels_last() -> None:
    """The chain gives the ops channels_last batches on a CPU: each op family gives the same pixels as on NCHW."""
    aa = AutoAugment("ta_wide")
    table = aa.table(24, 24, torch.device("cpu"))
    imgs = edge_images(24).repeat(3, 1, 1, 1)
    last = imgs.contiguous(memory_format=torch.channels_last)
    for s in range(0, len(table.magnitude), 7):
        slots = torch.full((len(imgs),), s)
        assert torch.equal(apply_slots(last, slots, table, aa.mode), apply_slots(imgs, slots, table, aa.mode)), s
