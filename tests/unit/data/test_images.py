"""Image files (`dtl.data.images`): the load-time check, finding files and decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dtl.data import images
from dtl.data.cifar import make_synthetic
from dtl.errors import UserError


def _save(path, size=(24, 16), mode="RGB", **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 90).save(path, **kw)


def test_check_image_catches_a_truncated_jpeg_that_pil_verify_passes(tmp_path):
    img = Image.fromarray(make_synthetic(1, size=64).images[0].permute(1, 2, 0).numpy())
    img.save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with Image.open(tmp_path / "cut.jpg") as im:
        im.verify()  # the header check alone would let it through
    assert images.check_image(tmp_path / "ok.jpg") is None
    assert "truncated" in images.check_image(tmp_path / "cut.jpg")


def test_scan_names_every_unreadable_file(tmp_path):
    paths = []
    for i in range(images._SCAN_CHUNK + 3):  # more than one chunk: several threads
        _save(tmp_path / f"{i:04d}.png", size=(4, 4))
        paths.append(str(tmp_path / f"{i:04d}.png"))
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    png = (tmp_path / "0000.png").read_bytes()
    (tmp_path / "half.png").write_bytes(png[: len(png) // 2])
    bad = images.scan([*paths, str(tmp_path / "noise.jpg"), str(tmp_path / "half.png")])
    assert sorted(bad) == [str(tmp_path / "half.png"), str(tmp_path / "noise.jpg")]
    assert all(reason for reason in bad.values())


def test_walk_and_find_images(tmp_path):
    _save(tmp_path / "a" / "x.PNG")
    _save(tmp_path / "a" / "deep" / "y.jpg")
    _save(tmp_path / "a" / ".hidden" / "z.png")  # hidden folders are skipped
    _save(tmp_path / "a" / ".z.png", format="PNG")  # and hidden files
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    walked = images.walk_images(tmp_path / "a")
    assert walked == [tmp_path / "a" / "deep" / "y.jpg", tmp_path / "a" / "x.PNG"]
    assert images.is_image_file("b.WebP") and not images.is_image_file(".b.png") and not images.is_image_file("b.gif")
    # files named as such are taken whatever their extension; folders give their image files
    found = images.find_images([tmp_path / "a" / "notes.txt", tmp_path / "a"])
    assert found == [tmp_path / "a" / "notes.txt", *walked]
    with pytest.raises(UserError, match="no such file"):
        images.find_images([tmp_path / "missing"])


@pytest.mark.parametrize("name,mode", [("rgba.png", "RGBA"), ("palette.png", "P"), ("grey.bmp", "L"),
                                       ("rgb.tiff", "RGB"), ("grey16.png", "I;16")])
def test_decode_gives_uint8_rgb(tmp_path, name, mode):
    _save(tmp_path / name, size=(7, 5), mode=mode)
    img = images.decode(tmp_path / name)
    assert img.dtype == torch.uint8 and img.shape == (3, 5, 7) and img.is_contiguous()


def _photo(path, size=(40, 30), seed=0) -> torch.Tensor:
    """A JPEG or PNG of a synthetic image; returns what PIL decodes from the file."""
    arr = make_synthetic(1, size=48, seed=seed).images[0].permute(1, 2, 0).numpy()
    Image.fromarray(arr).resize(size).save(path, quality=90)
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("decoder", ["torchvision", "torchcodec"])
def test_both_decoders_decode_jpeg_and_png_like_pil_without_deprecation_warnings(tmp_path, decoder, recwarn):
    if decoder == "torchcodec" and not images.torchcodec_available():
        pytest.skip("TorchCodec is not installed (the optional extra dtl[torchcodec])")
    for name in ("a.jpg", "b.png"):
        want = _photo(tmp_path / name)
        got = images.decode(tmp_path / name, decoder)
        assert got.dtype == torch.uint8 and got.shape == want.shape
        # libjpeg-turbo in all three; PNG is lossless
        assert (got.int() - want.int()).abs().max() <= (0 if name.endswith("png") else 1)
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    assert images.resolve_decoder(decoder) == decoder


def test_auto_decoder_prefers_torchcodec_and_a_missing_one_is_a_clear_error(monkeypatch):
    assert images.resolve_decoder("auto") == ("torchcodec" if images.torchcodec_available() else "torchvision")
    monkeypatch.setattr(images, "torchcodec_available", lambda: False)
    assert images.resolve_decoder("auto") == "torchvision"
    with pytest.raises(UserError, match=r"dtl\[torchcodec\]"):
        images.resolve_decoder("torchcodec")


@pytest.mark.parametrize("decoder", ["torchvision", "torchcodec"])
def test_batched_decode_falls_back_per_image_for_non_jpeg_and_refused_files(tmp_path, decoder, monkeypatch):
    """The nvJPEG path's logic, run on the CPU (the decoders take device="cpu" too): one batched call for the
    JPEGs; a PNG, and a JPEG the batched decoder refuses (nvJPEG refuses some that libjpeg reads, e.g. unusual
    subsamplings: simulated here), are decoded by `decode`, the others keep their batched result."""
    if decoder == "torchcodec" and not images.torchcodec_available():
        pytest.skip("TorchCodec is not installed")
    paths = [tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "c.jpg", tmp_path / "d.jpg"]
    for i, p in enumerate(paths):
        _photo(p, seed=i)
    refused = images.read_bytes(paths[3])
    real, calls = images._gpu_jpegs, []

    def picky(data, device, lib):
        calls.append(len(data))
        if any(torch.equal(d, refused) for d in data):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, device, lib)

    monkeypatch.setattr(images, "_gpu_jpegs", picky)
    got = images.decode_batch(paths, "cpu", decoder, batched=True)
    assert calls == [3, 1, 1, 1]  # the batch of 3 JPEGs, then each alone
    assert [tuple(g.shape) for g in got] == [(3, 30, 40)] * 4
    for p, g in zip(paths, got):
        assert torch.equal(g, images.decode(p, decoder))
    assert images.is_jpeg(images.read_bytes(paths[0])) and not images.is_jpeg(images.read_bytes(paths[1]))
