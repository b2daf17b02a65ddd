"""dtl.data.augment.transform: the batched preprocessing must match torchvision's per-image pipeline.

Resampling is compared image by image with torchvision's functional ops (the boxes' distribution is tested in
test_boxes.py). The reference is computed on the *float* image ``img / 255``: torchvision's uint8 resize kernel
rounds its result to uint8 (and uses fixed-point weights), which is a less accurate version of the same quantity,
so comparing to it would need a tolerance of a grey level; that relation is checked separately with that looser
tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dtl.data.augment.boxes import sample_crop_boxes, sample_flips
from dtl.data.augment.transform import BatchTransform, resize_center_crop, resized_crop
from dtl.data.constants import IMAGENET_MEAN, IMAGENET_STD

# Resampling tolerance in normalised units (values span about [-2.1, 2.7]). Observed errors are ~1e-6
# (float32 rounding of weights and sums); one uint8 grey level is 1 / 255 / 0.225 ~= 0.017, so 1e-4 is
# far below anything visible yet well above float32 noise.
ATOL = 1e-4


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def reference_crop(img: torch.Tensor, box, size: int, flip: bool) -> torch.Tensor:
    """torchvision per-image pipeline on the float image (see module docstring for why float)."""
    top, left, h, w = (int(v) for v in box)
    x = F.to_dtype(img, torch.float32, scale=True)
    x = F.resized_crop(x, top, left, h, w, [size, size], antialias=True)
    if flip:
        x = F.hflip(x)
    return F.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


def reference_eval(img: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's v2 Resize(size) + CenterCrop(size) + ToDtype + Normalize, on the float image."""
    resize_crop = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    x = resize_crop(F.to_dtype(img, torch.float32, scale=True))
    return F.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


def assert_matches(out: torch.Tensor, ref: torch.Tensor, what: str, atol: float = ATOL) -> None:
    """Same shape and max absolute difference <= atol (cheaper than assert_close on big tensors)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:.3g}"


def random_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)


# --------------------------------------------------------------------------------------------------
# exactness of the resampling
# --------------------------------------------------------------------------------------------------

# Boxes on a 32x32 image: full image, interior, 1-pixel-wide left/right edge columns, 1-pixel-tall
# bottom row.
BOXES_32 = [(0, 0, 32, 32), (5, 7, 16, 20), (0, 0, 32, 1), (0, 31, 32, 1), (31, 0, 1, 32)]

# (image height, image width, output size, boxes as (top, left, h, w))
CROP_CASES = [
    # 32x32, upsampling to 224 (the ImageNet-backbone case) and to 32 (native resolution); plus tiny boxes.
    (32, 32, 224, [*BOXES_32, (3, 4, 1, 1)]),
    (32, 32, 32, [*BOXES_32, (9, 2, 3, 2)]),
    # Downsampling (antialias filter wider than one pixel): larger source, and a smaller output.
    (96, 96, 32, [(0, 0, 96, 96), (10, 3, 80, 60), (50, 40, 46, 56), (0, 95, 96, 1)]),
    (32, 32, 13, [(0, 0, 32, 32), (4, 1, 27, 30), (0, 0, 20, 32)]),
    # Non-square source.
    (24, 40, 32, [(0, 0, 24, 40), (2, 5, 20, 30), (0, 39, 24, 1), (23, 0, 1, 40)]),
    (24, 40, 224, [(0, 0, 24, 40), (2, 5, 20, 30)]),
    # A large source (an image folder's cache at 224 px; on a CPU the native-kernel path, NATIVE_MIN_SIDE).
    (120, 100, 112, [(0, 0, 120, 100), (10, 7, 70, 90), (0, 99, 120, 1), (119, 0, 1, 100)]),
]


@pytest.mark.parametrize(("height", "width", "size", "box_list"), CROP_CASES)
def test_resized_crop_matches_torchvision(height, width, size, box_list) -> None:
    n = 2 * len(box_list)
    images = random_images(n, height, width, seed=height * 1000 + size)
    boxes = torch.tensor(box_list + box_list, dtype=torch.int64)  # every box without and with flip
    flips = torch.arange(n) >= len(box_list)
    out = resized_crop(images, boxes, size, flips, channels_last=False)
    assert out.shape == (n, 3, size, size) and out.dtype == torch.float32
    for i in range(n):
        ref = reference_crop(images[i], boxes[i].tolist(), size, bool(flips[i]))
        assert_matches(out[i], ref, f"image {i}, box {boxes[i].tolist()}, flip {bool(flips[i])}")


def test_resized_crop_random_batch_matches_torchvision() -> None:
    # Many different boxes in one batch: per-image weights must not leak between images.
    g = torch.Generator().manual_seed(7)
    images = random_images(32, 32, 32, seed=7)
    boxes = sample_crop_boxes(32, 32, 32, scale=(0.05, 1.0), generator=g)
    flips = sample_flips(32, generator=g)
    for size in (32, 224):
        out = resized_crop(images, boxes, size, flips)
        for i in range(32):
            ref = reference_crop(images[i], boxes[i].tolist(), size, bool(flips[i]))
            assert_matches(out[i], ref, f"size {size}, image {i}")


def test_resized_crop_without_flips_argument() -> None:
    images = random_images(3, 32, 32, seed=8)
    boxes = torch.tensor([(1, 2, 20, 25)] * 3)
    torch.testing.assert_close(
        resized_crop(images, boxes, 40), resized_crop(images, boxes, 40, torch.zeros(3, dtype=torch.bool))
    )


def test_resized_crop_vs_uint8_torchvision_within_one_grey_level() -> None:
    # torchvision's uint8 kernel (what RandomResizedCrop does on uint8 tensors) rounds to uint8 and uses
    # fixed-point weights, so it can differ from the exact float result by about one grey level
    # (observed max 1.0008 levels); 1.5 levels, in normalised units, bounds that.
    images = random_images(16, 32, 32, seed=9)
    boxes = sample_crop_boxes(16, 32, 32, generator=torch.Generator().manual_seed(9))
    out = resized_crop(images, boxes, 224, channels_last=False)
    tol = 1.5 / 255 / min(IMAGENET_STD)
    for i in range(16):
        top, left, h, w = boxes[i].tolist()
        ref = F.resized_crop(images[i], top, left, h, w, [224, 224], antialias=True)
        ref = F.normalize(F.to_dtype(ref, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
        assert (out[i] - ref).abs().max().item() <= tol


@pytest.mark.parametrize(
    ("height", "width", "size", "resized_hw"),
    [
        (32, 32, 224, (224, 224)),  # upsampling
        (32, 32, 32, (32, 32)),  # identity (torchvision returns the image unchanged)
        (96, 96, 32, (32, 32)),  # downsampling
        (32, 32, 20, (20, 20)),  # downsampling by a non-integer factor
        (24, 40, 32, (32, 53)),  # non-square: shorter side -> size, longer = int(32 * 40 / 24); crop at 10.5 -> 10
        (40, 24, 16, (26, 16)),  # non-square, portrait, downsampling
        (120, 100, 80, (96, 80)),  # a large source: on a CPU the native kernel, then the crop
        (64, 80, 64, (64, 80)),  # already at the size on its shorter side: the crop alone
    ],
)
def test_resize_center_crop_matches_torchvisions_resize_and_center_crop(height, width, size, resized_hw) -> None:
    """The batched eval resize is v2's Resize(size) + CenterCrop(size) (the geometry of
    `dtl.data.preprocessing.eval_resize`), whatever the shape of the source."""
    images = random_images(4, height, width, seed=size + height)
    out = resize_center_crop(images, size, channels_last=False)
    assert out.shape == (4, 3, size, size)
    assert tuple(F.resize(images[0], [size], antialias=True).shape[1:]) == resized_hw
    for i in range(4):
        assert_matches(out[i], reference_eval(images[i], size), f"image {i}")


def test_an_image_at_the_size_is_only_normalised() -> None:
    """The identity weights are skipped: an image already at the size comes back normalised as is."""
    square = random_images(2, 40, 40, seed=4)
    shortcut = resize_center_crop(square, 40, channels_last=False)
    want = F.normalize(F.to_dtype(square, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(shortcut, want, atol=1e-6, rtol=0)


def test_float_input_is_taken_as_unit_range() -> None:
    images = random_images(2, 32, 32, seed=10)
    boxes = torch.tensor([(0, 0, 32, 32), (4, 4, 20, 20)])
    as_float = images.float() / 255
    assert_matches(resized_crop(as_float, boxes, 48), resized_crop(images, boxes, 48), "resized_crop")
    assert_matches(resize_center_crop(as_float, 48), resize_center_crop(images, 48), "resize")


# --------------------------------------------------------------------------------------------------
# dtype / memory layout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_and_layout(dtype: torch.dtype, channels_last: bool) -> None:
    images = random_images(5, 32, 32, seed=11)
    boxes = sample_crop_boxes(5, 32, 32, generator=torch.Generator().manual_seed(11))
    flips = sample_flips(5, generator=torch.Generator().manual_seed(12))
    references = [
        resized_crop(images, boxes, 64, flips, channels_last=False),
        resize_center_crop(images, 64, channels_last=False),
    ]
    outputs = [
        resized_crop(images, boxes, 64, flips, dtype=dtype, channels_last=channels_last),
        resize_center_crop(images, 64, dtype=dtype, channels_last=channels_last),
    ]
    # Layout must not change the values; bf16 only rounds them: 8 significant bits, so for |values| < 4
    # (here they are within about [-2.2, 2.7]) the rounding error is at most half an ulp = 2**-7.
    atol = ATOL if dtype == torch.float32 else 2**-7 + ATOL
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for out, ref in zip(outputs, references, strict=True):
        assert out.dtype == dtype and out.shape == (5, 3, 64, 64)
        assert out.is_contiguous(memory_format=fmt)
        assert_matches(out, ref, f"{dtype}, channels_last={channels_last}", atol=atol)


def test_channels_last_input() -> None:
    images = random_images(4, 32, 32, seed=13)
    boxes = sample_crop_boxes(4, 32, 32, generator=torch.Generator().manual_seed(13))
    cl_images = images.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(resized_crop(cl_images, boxes, 48), resized_crop(images, boxes, 48))
    torch.testing.assert_close(resize_center_crop(cl_images, 48), resize_center_crop(images, 48))


def test_custom_mean_std() -> None:
    # mean 0 / std 1/255 undoes the scaling: the output is the resized image in grey levels.
    images = random_images(2, 32, 32, seed=14)
    out = resize_center_crop(images, 32, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, channels_last=False)
    torch.testing.assert_close(out, images.float(), atol=1e-3, rtol=0)


def test_bad_inputs_are_rejected() -> None:
    images = random_images(2, 32, 32)
    with pytest.raises(ValueError):
        resized_crop(images, torch.zeros(3, 4, dtype=torch.int64), 32)
    with pytest.raises(ValueError):
        resize_center_crop(images[0], 32)
    with pytest.raises(TypeError):
        resize_center_crop(images.to(torch.int32), 32)


# --------------------------------------------------------------------------------------------------
# BatchTransform
# --------------------------------------------------------------------------------------------------


def test_batch_transform_train_is_reproducible() -> None:
    images = random_images(16, 32, 32, seed=15)
    transform = BatchTransform(train=True, size=48)
    a = transform(images, torch.Generator().manual_seed(123))
    b = transform(images, torch.Generator().manual_seed(123))
    c = transform(images, torch.Generator().manual_seed(124))
    assert a.shape == (16, 3, 48, 48) and a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batch_transform_train_equals_functional_pipeline() -> None:
    # __call__ draws boxes, then flips, from the generator: replaying that gives the same output.
    images = random_images(8, 32, 32, seed=16)
    transform = BatchTransform(train=True, size=40, dtype=torch.bfloat16, channels_last=False)
    out = transform(images, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    boxes = sample_crop_boxes(8, 32, 32, generator=g)
    flips = sample_flips(8, generator=g)
    expected = resized_crop(images, boxes, 40, flips, dtype=torch.bfloat16, channels_last=False)
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    assert torch.equal(out, expected)


def test_batch_transform_eval_is_deterministic_resize() -> None:
    images = random_images(6, 32, 32, seed=17)
    transform = BatchTransform(train=False, size=64)
    a = transform(images, torch.Generator().manual_seed(1))
    b = transform(images, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert torch.equal(a, resize_center_crop(images, 64))
    assert "train=False" in repr(transform)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    images = random_images(32, 32, 32, seed=18)
    boxes = sample_crop_boxes(32, 32, 32, generator=torch.Generator().manual_seed(18))
    flips = sample_flips(32, generator=torch.Generator().manual_seed(19))
    cpu = resized_crop(images, boxes, 224, flips)
    gpu = resized_crop(images.cuda(), boxes.cuda(), 224, flips.cuda())
    # TF32 matmuls (if the caller enabled them) have a 10-bit mantissa: allow ~1e-3 relative error.
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-2, rtol=0)
    transform = BatchTransform(train=True, size=224)
    g = torch.Generator(device="cuda").manual_seed(0)
    out = transform(images.cuda(), g)
    assert out.device.type == "cuda" and out.shape == (32, 3, 224, 224)
    # A CPU generator draws the same boxes/flips as on CPU; they are then copied to the GPU.
    on_gpu = transform(images.cuda(), torch.Generator().manual_seed(0))
    on_cpu = transform(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-2, rtol=0)
    on_gpu, on_cpu = resize_center_crop(images.cuda(), 224).cpu(), resize_center_crop(images, 224)
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-2, rtol=0)


def test_skip_replays_the_random_stream():
    """A resume skips batches with `skip`; the next batch must equal the uninterrupted run's."""
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    transform = BatchTransform(train=True, size=32)
    g1 = torch.Generator().manual_seed(11)
    transform(images, g1)
    want = transform(images, g1)
    g2 = torch.Generator().manual_seed(11)
    transform.skip(6, (32, 32), g2)
    assert torch.equal(transform(images, g2), want)
