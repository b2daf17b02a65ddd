"""Image files: which files count as images, finding them, checking them once, decoding them to uint8 RGB
tensors, and the pretrained backbones' eval preprocessing.

The load-time check (`check_image`, run over a whole folder by `scan`) is a PIL header check + `verify()`,
which also validates every PNG chunk checksum, plus a decode of any JPEG that does not end in an
end-of-image marker, i.e. a truncated one: cheap enough for every file of a data set, and it catches what
would otherwise crash a DataLoader worker hours into a run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dtl.errors import UserError

#: torchvision's ImageFolder extensions (matched case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Formats torchvision.io decodes natively; the others go through PIL.
_TV_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
_SCAN_THREADS = 8
_SCAN_CHUNK = 256


# ---- decoding ------------------------------------------------------------------------------------

def decode(path: str | Path) -> torch.Tensor:
    """An image file as a uint8 RGB tensor (3, H, W): torchvision.io for JPEG/PNG/WebP/GIF, PIL for the rest
    (BMP, TIFF, PPM/PGM) and as a fallback. Grey, palette and RGBA images become RGB; 16-bit PNGs are scaled
    to 8 bits; animated images give their first frame; EXIF orientation is not applied (as ImageFolder)."""
    # torchvision.io, its transforms and PIL are imported when first used: importing dtl stays fast.
    path = str(path)
    img = None
    if path.lower().endswith(_TV_EXTENSIONS):
        from torchvision.io import ImageReadMode, decode_image

        try:
            img = decode_image(path, mode=ImageReadMode.RGB)
        except RuntimeError:
            img = None  # let PIL try: it reads some variants libjpeg/libpng builds refuse
    if img is None:
        img = _pil_decode(path)
    if img.ndim == 4:
        img = img[0]
    if img.dtype != torch.uint8:
        from torchvision.transforms.v2 import functional as F

        img = F.to_dtype(img, torch.uint8, scale=True)
    return img.contiguous()


def _pil_decode(path: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


# ---- the load-time check -------------------------------------------------------------------------

def _jpeg_complete(path: str) -> bool:
    """True when the file ends in a JPEG end-of-image marker (FF D9), ignoring trailing padding."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 4096))
        tail = f.read().rstrip(b"\0\r\n\t ")
    return tail.endswith(b"\xff\xd9")


def check_image(path: str | Path) -> str | None:
    """None when the file looks like a readable image, else the reason (cheap: no full decode unless a JPEG
    lacks its end marker)."""
    from PIL import Image

    path = str(path)
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files; all mean "unreadable"
        return f"{type(err).__name__}: {err}"
    if fmt == "JPEG" and not _jpeg_complete(path):
        try:
            decode(path)
        except Exception as err:  # noqa: BLE001
            return f"truncated JPEG ({str(err).splitlines()[-1][-120:]})"
    return None


def scan(paths: Sequence[str]) -> dict[str, str]:
    """{path: reason} of the unreadable files among `paths` (checked in a few threads: it is mostly I/O)."""
    chunks = [paths[i:i + _SCAN_CHUNK] for i in range(0, len(paths), _SCAN_CHUNK)]

    def check_chunk(chunk: Sequence[str]) -> list[tuple[str, str]]:
        return [(p, reason) for p in chunk if (reason := check_image(p)) is not None]

    bad: dict[str, str] = {}
    workers = max(1, min(_SCAN_THREADS, os.cpu_count() or 1, len(chunks)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for found in pool.map(check_chunk, chunks):
            bad.update(found)
    return bad


# ---- finding files -------------------------------------------------------------------------------

def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def walk_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively (following links), hidden entries skipped, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(f))
    return sorted(found)


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files given as such (any extension) and the image files under folders given (recursive, sorted)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(walk_images(path))
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return found


# ---- preprocessing -------------------------------------------------------------------------------
