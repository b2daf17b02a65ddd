"""Image files (`dtl.images`): the load-time check, finding files, decoding and the eval preprocessing."""

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
