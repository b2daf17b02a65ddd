"""dtl.data.augment.chain: the uint8 training chain equals torchvision's reference recipe per image (pad crop exact,
resized crop within one grey level of v2's uint8 kernel), given the same draws; skip() replays the draws."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dtl.data.augment.autoaugment import AutoAugment
from dtl.data.augment.boxes import sample_crop_boxes, sample_flips
from dtl.data.augment.chain import AugmentChain, pad_crop, resize_uint8, resized_crop_uint8, sample_pad_offsets
from dtl.data.augment.transform import BatchTransform, resized_crop
from dtl.data.constants import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import TINY, assert_same_weights, rewind_copy, train_inproc

# float32 normalisation noise; one grey level is ~0.017 in these units
ATOL = 1e-5


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["reflect", "constant"])
@pytest.mark.parametrize(("size", "padding"), [(32, 4), (16, 0), (16, 7)])
def test_pad_crop_equals_torchvision_random_crop(mode: str, size: int, padding: int) -> None:
    """v2.RandomCrop(size, padding, padding_mode) + hflip, with our offsets: exact."""
    imgs = images(48, size, size)
    g = torch.Generator().manual_seed(1)
    offsets = sample_pad_offsets(48, size, size, size, padding, g)
    flips = sample_flips(48, g)
    ours = pad_crop(imgs, offsets, size, padding, mode, flips)
    assert offsets.min() >= 0 and offsets.max() <= 2 * padding
    for i in range(48):
        ref = F.crop(F.pad(imgs[i], [padding], fill=0, padding_mode=mode), *offsets[i].tolist(), size, size)
        assert torch.equal(ours[i], F.hflip(ref) if flips[i] else ref), i


def test_pad_offsets_cover_the_range_uniformly() -> None:
    offsets = sample_pad_offsets(9000, 32, 32, 32, 4, torch.Generator().manual_seed(0))
    counts = torch.bincount(offsets.flatten(), minlength=9)
    assert counts.numel() == 9 and counts.min() > 0.8 * 2000 and counts.max() < 1.2 * 2000


def test_resized_crop_uint8_within_one_grey_level_of_torchvision() -> None:
    """v2's uint8 kernel on AVX2/AVX-512 CPUs uses fixed-point weights: at most one grey level apart. Against
    the float kernel + round (what v2 does on GPUs), equal except at float32 ties."""
    imgs = images(32, 32, 40)
    g = torch.Generator().manual_seed(2)
    boxes = sample_crop_boxes(32, 32, 40, (0.08, 1.0), generator=g)
    flips = sample_flips(32, g)
    ours = resized_crop_uint8(imgs, boxes, 24, flips)
    ties = 0
    for i in range(32):
        ref = F.resized_crop(imgs[i], *boxes[i].tolist(), [24, 24], antialias=True)
        ref_float = F.resized_crop(imgs[i].float(), *boxes[i].tolist(), [24, 24], antialias=True).round()
        if flips[i]:
            ref, ref_float = F.hflip(ref), F.hflip(ref_float)
        assert (ours[i].int() - ref.int()).abs().max() <= 1
        ties += int((ours[i].float() != ref_float).sum())
    assert ties <= 0.001 * ours.numel()


def test_resize_uint8_shorter_side() -> None:
    imgs = images(4, 20, 30)
    out = resize_uint8(imgs, 16)
    assert out.shape == (4, 3, 16, 24)
    for i in range(4):
        assert (out[i].int() - F.resize(imgs[i], [16], antialias=True).int()).abs().max() <= 1
    square = imgs[:, :, :, :20]
    assert resize_uint8(square, 20) is square  # already the size: untouched, as v2.Resize returns it


def reference(img: torch.Tensor, crop: torch.Tensor, flip: bool, op: tuple[str, float] | None,
              box: list[int] | None, padding: int, mode: str, size: int) -> torch.Tensor:
    """torchvision per image: pad + crop, flip, the auto-augment op, ToDtype, Normalize, erase (value 0)."""
    x = F.crop(F.pad(img, [padding], fill=0, padding_mode=mode), *crop.tolist(), size, size)
    x = F.hflip(x) if flip else x
    if op is not None:
        tv = v2.TrivialAugmentWide()
        x = tv._apply_image_or_video_transform(x, op[0], op[1], tv.interpolation, tv._fill)
    x = F.normalize(F.to_dtype(x, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    if box is not None and box[2] > 0:
        x = F.erase(x, *box, v=torch.zeros(3, 1, 1))
    return x


def test_pad_chain_equals_the_torchvision_recipe_given_the_same_draws() -> None:
    chain = AugmentChain(24, crop="pad", padding=3, padding_mode="reflect", auto_augment=AutoAugment("ta_wide"),
                         erasing=0.5, channels_last=False)
    imgs = images(64, 24, 24)
    out = chain(imgs, torch.Generator().manual_seed(4))
    d = chain.draw(64, (24, 24), torch.Generator().manual_seed(4), torch.device("cpu"))
    table = chain.auto_augment.table(24, 24, torch.device("cpu"))
    assert d.erasing is not None and 0 < int((d.erasing[:, 2] > 0).sum()) < 64
    for i in range(64):
        s = int(d.augment.slots[i, 0])
        op = (table.ops[int(table.op[s])], table.magnitude[s])
        ref = reference(imgs[i], d.crop[i], bool(d.flips[i]), op, d.erasing[i].tolist(), 3, "reflect", 24)
        assert (out[i] - ref).abs().max() <= ATOL, i


def test_resize_then_pad_crop_for_other_sizes() -> None:
    """--crop pad with image_size != the source size: Resize(image_size) first (within one grey level)."""
    chain = AugmentChain(16, crop="pad", channels_last=False)
    imgs = images(8, 32, 32)
    out = chain(imgs, torch.Generator().manual_seed(5))
    d = chain.draw(8, (32, 32), torch.Generator().manual_seed(5), torch.device("cpu"))
    for i in range(8):
        ref = reference(F.resize(imgs[i], [16], antialias=True), d.crop[i], bool(d.flips[i]), None, None, 4,
                        "constant", 16)
        assert out[i].shape == (3, 16, 16) and (out[i] - ref).abs().max() <= 1 / 255 / 0.224 + ATOL


@pytest.mark.parametrize("kwargs", [{"crop": "resized", "auto_augment": AutoAugment("augmix")},
                                    {"crop": "pad", "erasing": 0.3, "erasing_value": "random"},
                                    {"crop": "resized", "auto_augment": AutoAugment("randaugment"), "erasing": 1.0}])
def test_skip_consumes_exactly_the_draws_of_a_call(kwargs: dict) -> None:
    chain = AugmentChain(16, **kwargs)
    g1, g2 = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    out = chain(images(10, 20, 20), g1)
    chain.skip(10, (20, 20), g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert out.shape == (10, 3, 16, 16) and out.is_contiguous(memory_format=torch.channels_last)


def test_crop_scale_reaches_the_fused_transform() -> None:
    """--crop-scale: BatchTransform draws its boxes with the given scale (same stream as sample_crop_boxes)."""
    imgs = images(16, 32, 32)
    ours = BatchTransform(True, 16, scale=(0.08, 1.0))(imgs, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    boxes = sample_crop_boxes(16, 32, 32, (0.08, 1.0), generator=g)
    assert torch.equal(ours, resized_crop(imgs, boxes, 16, sample_flips(16, g)))
    assert (boxes[:, 2] * boxes[:, 3]).min() < 0.5 * 32 * 32  # areas below the default scale's 0.5 floor occur


@pytest.mark.slow
def test_training_with_trivial_augment_and_erasing_completes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = train_inproc(*TINY, "--epochs", "1", "--train-subset", "64", "--eval-subset", "32", "--auto-augment",
                        "ta_wide", "--random-erasing", "0.25", "--crop-scale", "0.08", "1", "--output-dir", str(out))
    assert code == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["auto_augment"] == "ta_wide" and saved["crop_scale"] == [0.08, 1.0]


@pytest.mark.slow
def test_mid_epoch_resume_with_the_chain_is_bitwise(tmp_path: Path) -> None:
    """One process: a run resumed from a mid-epoch checkpoint ends with the same weights as the full run, with
    TA + pad crop + random erasing (random values) on."""
    # 160 px: the device loader transforms 2 batches per call, so the resume replays (skip()s) two chunks
    flags = [*TINY, "--image-size", "160", "--train-subset", "48", "--eval-subset", "8", "--batch-size", "8",
             "--seed", "5", "--crop",
             "pad", "--auto-augment", "ta_wide", "--random-erasing", "0.5", "--random-erasing-value", "random",
             "--checkpoint-every-steps", "2", "--keep-last", "20", "--epochs", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_inproc(*flags, "--output-dir", str(full)) == 0
    rewind_copy(full, part, 4)  # keep step 4 of 6: in the middle of epoch 1
    assert train_inproc(*flags, "--output-dir", str(part), "--resume", "auto") == 0
    assert_same_weights(full, part)


def test_erasing_alone_keeps_the_fused_float_crop() -> None:
    """--random-erasing without auto-augment: BatchTransform's exact float output, then the erased boxes."""
    imgs = images(12, 32, 32)
    chain = AugmentChain(24, erasing=0.5, scale=(0.3, 1.0))
    out = chain(imgs, torch.Generator().manual_seed(8))
    fused = BatchTransform(True, 24, scale=(0.3, 1.0))(imgs, torch.Generator().manual_seed(8))
    d = chain.draw(12, (32, 32), torch.Generator().manual_seed(8), torch.device("cpu"))
    erased = torch.zeros(12, 1, 24, 24, dtype=torch.bool)
    for i, (top, left, h, w) in enumerate(d.erasing.tolist()):
        erased[i, :, top:top + h, left:left + w] = True
    assert erased.any() and torch.equal(out, torch.where(erased, 0.0, fused))
