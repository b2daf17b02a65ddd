"""dtl.data.folder_split: a folder split's images decode lazily to uint8 RGB, and a file that breaks after the
load-time check is replaced by another image of its class instead of crashing a worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dtl.data import folder, images
from dtl.data.preprocessing import eval_transform
from tests.unit.data.test_folder import cfg_for, dtl_log, write_folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("folder_split") / "images"
    return root, write_folder(root)


def test_images_decode_lazily_to_uint8_and_resize_to_one_size(image_dir):
    root, _ = image_dir
    split = folder.load_folder_splits(cfg_for(root, val_split=0.25)).train
    shapes = set()
    for i in range(len(split)):
        img = split.images[i]
        assert img.dtype == torch.uint8 and img.shape[0] == 3
        shapes.add(tuple(img.shape[1:]))
        out = eval_transform(32)(img)  # Resize + CenterCrop: one size whatever the input
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert shapes == {(32, 32), (32, 48), (40, 32)}
    grey = Image.fromarray(np.full((20, 30), 128, np.uint8))
    grey.save(root.parent / "grey.png")
    assert images.decode(root.parent / "grey.png").shape == (3, 20, 30)


def test_a_file_that_breaks_after_the_check_does_not_crash_the_worker(tmp_path):
    write_folder(tmp_path / "d", per_class=4, bad=False)
    split = folder.load_folder_splits(cfg_for(tmp_path / "d", val_split=0.25)).train
    victim = split.paths()[0]
    victim.write_bytes(b"gone bad")
    with dtl_log() as records:
        img = split.images[0]
    assert img.dtype == torch.uint8 and img.shape[0] == 3  # the next image of the same class
    assert any(str(victim) in r.getMessage() for r in records)
