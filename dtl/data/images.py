"""Image files: which files count as images, finding them, checking them once, and decoding them to uint8 RGB
tensors.

The load-time check (`check_image`, run over a whole folder by `scan`) is a PIL header check + `verify()`,
which also validates every PNG chunk checksum, plus a decode of any JPEG that does not end in an
end-of-image marker, i.e. a truncated one: cheap enough for every file of a data set, and it catches what
would otherwise crash a DataLoader worker hours into a run.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
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

#: The libraries `decode` can use (`--image-decoder`): TorchCodec where installed (the extra
#: ``pip install 'dtl[torchcodec]'``), else torchvision.io (deprecated since torchvision 0.29 in favour of
#: TorchCodec, kept as the fallback for installs without it).
DECODERS = ("auto", "torchcodec", "torchvision")
_JPEG_MAGIC = b"\xff\xd8\xff"
#: PNG and GIF signatures (first 4 bytes): with JPEG and WebP, the formats the libraries decode from memory
_LIBRARY_MAGIC = (b"\x89PNG", b"GIF8")


@functools.cache
def torchcodec_available() -> bool:
    try:
        from torchcodec.decoders import decode_jpeg  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a build that cannot load its libraries: not usable
        return False
    return True


def resolve_decoder(name: str = "auto") -> str:
    """torchcodec | torchvision: `auto` takes TorchCodec where it is installed."""
    if name == "auto":
        return "torchcodec" if torchcodec_available() else "torchvision"
    if name == "torchcodec" and not torchcodec_available():
        raise UserError("--image-decoder torchcodec: TorchCodec is not installed (pip install 'dtl[torchcodec]'); "
                        "or use --image-decoder torchvision")
    return name


@contextlib.contextmanager
def _quiet_torchvision_io() -> Iterator[None]:
    """torchvision.io warns on every decode since 0.29 (DeprecationWarning: TorchCodec supersedes it). dtl uses
    it only as the fallback where TorchCodec is missing, knowingly: the warning would repeat per image."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        yield


def decode(path: str | Path, decoder: str = "auto") -> torch.Tensor:
    """An image file as a uint8 RGB tensor (3, H, W) on the CPU: TorchCodec or torchvision.io (`decoder`, see
    `resolve_decoder`) for JPEG/PNG/WebP/GIF, PIL for the rest (BMP, TIFF, PPM/PGM) and as a fallback. Grey,
    palette and RGBA images become RGB; 16-bit PNGs are scaled to 8 bits; animated images give their first
    frame; EXIF orientation is not applied (as ImageFolder)."""
    # torchvision.io, torchcodec, their transforms and PIL are imported when first used: importing dtl stays fast.
    path = str(path)
    img = None
    if path.lower().endswith(_TV_EXTENSIONS):
        try:
            img = _library_decode(path, resolve_decoder(decoder))
        except RuntimeError:
            img = None  # let PIL try: it reads some variants libjpeg/libpng builds refuse
    if img is None:
        img = _pil_decode(path)
    return _rgb8(img)


def decode_bytes(data: torch.Tensor | bytes, decoder: str = "auto") -> torch.Tensor:
    """An encoded image held in memory (a 1-D uint8 tensor or bytes: a row of an Arrow file, a member of a tar
    shard) as a uint8 RGB tensor (3, H, W), decoded as `decode` decodes a file: TorchCodec or torchvision.io for
    JPEG/PNG/WebP/GIF, PIL for the rest and as a fallback. Raises `BadImage` when no decoder can read it."""
    data = as_byte_tensor(data)
    img = None
    if bytes(data[:4].tolist()) in _LIBRARY_MAGIC or bytes(data[:3].tolist()) == _JPEG_MAGIC \
            or bytes(data[8:12].tolist()) == b"WEBP":
        try:
            img = _library_decode(data, resolve_decoder(decoder))
        except RuntimeError:
            img = None
    if img is None:
        try:
            img = _pil_decode(io.BytesIO(data.numpy().tobytes()))
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data; all mean "unreadable"
            raise BadImage(f"{type(err).__name__}: {err}") from None
    return _rgb8(img)


def as_byte_tensor(data: torch.Tensor | bytes | bytearray | memoryview) -> torch.Tensor:
    """Encoded bytes as the 1-D uint8 CPU tensor the decoders take (bytes are copied once: a tensor over
    immutable bytes would be read-only)."""
    if isinstance(data, torch.Tensor):
        return data
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)


class BadImage(ValueError):
    """Encoded image data that no decoder can read (the message says why)."""


def _library_decode(source: str | torch.Tensor, decoder: str) -> torch.Tensor:
    if decoder == "torchcodec":
        from torchcodec.decoders import decode_image as tc_decode

        try:
            return tc_decode(source, mode="RGB")
        except (ValueError, OSError) as err:  # TorchCodec's "cannot decode": let PIL try, as with torchvision
            raise RuntimeError(str(err)) from None
    from torchvision.io import ImageReadMode, decode_image

    with _quiet_torchvision_io():
        if isinstance(source, str):
            from torchvision.io import read_file

            source = read_file(source)
        return decode_image(source, mode=ImageReadMode.RGB)


def _rgb8(img: torch.Tensor) -> torch.Tensor:
    if img.ndim == 4:
        img = img[0]
    if img.dtype != torch.uint8:
        from torchvision.transforms.v2 import functional as F

        img = F.to_dtype(img, torch.uint8, scale=True)
    return img.contiguous()


def is_jpeg(data: bytes | torch.Tensor) -> bool:
    head = bytes(data[:3].tolist()) if isinstance(data, torch.Tensor) else bytes(data[:3])
    return head == _JPEG_MAGIC


def read_bytes(path: str | Path) -> torch.Tensor:
    """A file's encoded bytes as a 1-D uint8 CPU tensor (what the batched decoders take)."""
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def decode_batch(paths: Sequence[str | Path] | None, device: torch.device | str = "cpu", decoder: str = "auto",
                 encoded: Sequence[torch.Tensor] | None = None, batched: bool | None = None) -> list[torch.Tensor]:
    """Images as uint8 RGB (3, H, W) tensors on `device`. On a CUDA device the JPEG files are decoded in one
    batched nvJPEG call (the decoder's ``device="cuda"``); the other formats, and any JPEG nvJPEG refuses (the
    batch is then retried one image at a time), are decoded on the CPU by `decode` and copied. On the CPU each
    file goes through `decode` (a batch is not faster there) unless `batched` asks for the batched path (tests
    run it on the CPU). `encoded`: the files' bytes, when a worker already read them (`read_bytes`); `paths`
    None: images held only in memory (an HF data set's rows, a shard's members), decoded by `decode_bytes`."""
    device = torch.device(device)
    if paths is None and encoded is None:
        raise ValueError("decode_batch needs the paths or the encoded bytes")

    def on_cpu(i: int) -> torch.Tensor:
        return decode(paths[i], decoder) if paths is not None else decode_bytes(data[i], decoder)

    if not (device.type == "cuda" if batched is None else batched):
        if paths is not None:
            return [decode(p, decoder) for p in paths]
        return [decode_bytes(d, decoder) for d in encoded]  # type: ignore[union-attr] - checked above
    data = list(encoded) if encoded is not None else [read_bytes(p) for p in paths]  # type: ignore[union-attr]
    out: list[torch.Tensor | None] = [None] * len(data)
    jpegs = [i for i, d in enumerate(data) if is_jpeg(d)]
    if jpegs:
        lib = resolve_decoder(decoder)
        try:
            for i, img in zip(jpegs, _gpu_jpegs([data[i] for i in jpegs], device, lib), strict=True):
                out[i] = img
        except RuntimeError:  # one bad file fails the whole batch: find it one by one
            for i in jpegs:
                try:
                    out[i] = _gpu_jpegs([data[i]], device, lib)[0]
                except RuntimeError:
                    out[i] = None
    return [img if img is not None else on_cpu(i).to(device, non_blocking=True) for i, img in enumerate(out)]


def _gpu_jpegs(data: list[torch.Tensor], device: torch.device, decoder: str) -> list[torch.Tensor]:
    if decoder == "torchcodec":
        from torchcodec.decoders import decode_jpeg as tc_jpeg

        try:
            return [_rgb8(t) for t in tc_jpeg(data, mode="RGB", device=device)]
        except (ValueError, OSError) as err:
            raise RuntimeError(str(err)) from None
    from torchvision.io import ImageReadMode, decode_jpeg

    with _quiet_torchvision_io():
        return [_rgb8(t) for t in decode_jpeg(data, mode=ImageReadMode.RGB, device=device)]


def _pil_decode(path: str | io.BytesIO) -> torch.Tensor:
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


def check_bytes(data: torch.Tensor | bytes) -> str | None:
    """`check_image` for an encoded image held in memory: None when it looks readable, else the reason (a PIL
    header check + `verify()`, and a full decode of a JPEG that lacks its end-of-image marker)."""
    from PIL import Image

    raw = data.numpy().tobytes() if isinstance(data, torch.Tensor) else bytes(data)
    if not raw:
        return "empty (0 bytes)"
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt = im.format
            im.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data; all mean "unreadable"
        return f"{type(err).__name__}: {err}"
    if fmt == "JPEG" and not raw[-4096:].rstrip(b"\0\r\n\t ").endswith(b"\xff\xd9"):
        try:
            decode_bytes(raw)
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
