"""Image folders (`--dataset folder`): torchvision's ImageFolder layout, decoded lazily by DataLoader workers.

Accepted layouts of ``--data-dir DATA_DIR`` (class names are the sorted names of the class folders; hidden
folders and files, e.g. ``.ipynb_checkpoints``, are ignored; class folders are searched recursively)::

    DATA_DIR/train/<class>/*.jpg  +  DATA_DIR/val/<class>/*.jpg    (or validation/, valid/, test/)
    DATA_DIR/train/<class>/*.jpg                                    held-out part: --val-split
    DATA_DIR/<class>/*.jpg                                          held-out part: --val-split

With ``--val-split F`` each class keeps round(F x its images) for evaluation (at least one, never all,
when it has two or more), chosen by a generator seeded with (--seed, class name): stratified and
reproducible. The split is saved as ``OUTDIR/split.json`` (paths relative to DATA_DIR, see `save_split`),
and a resumed run (or `dtl eval` of the run) reads it back instead of splitting again.

Every file is checked once at load time (PIL header check + `verify()`, which also validates every PNG
chunk checksum, plus a decode of any JPEG that does not end in an end-of-image marker, i.e. a truncated
one). Unreadable files are listed by path and skipped, or refused with `--strict-images`. Should a file
still fail to decode in a worker later (changed on disk, or damaged in a way the check cannot see), the
worker logs its path and uses the next image of the same class instead of crashing the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from dtl.config import Config
from dtl.data import Splits
from dtl.errors import UserError

log = logging.getLogger("dtl")

#: torchvision's ImageFolder extensions (matched case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Formats torchvision.io decodes natively; the others go through PIL.
_TV_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
#: Folder names accepted as the held-out split next to train/, in order of preference.
VAL_DIRS = ("val", "validation", "valid", "test")
SPLIT_FILE = "split.json"
SPLIT_FORMAT = "dtl-folder-split"
SPLIT_VERSION = 1
_SCAN_THREADS = 8
_SCAN_CHUNK = 256


# ---- decoding ------------------------------------------------------------------------------------

def decode(path: str | Path) -> torch.Tensor:
    """An image file as a uint8 RGB tensor (3, H, W): torchvision.io for JPEG/PNG/WebP/GIF, PIL for the rest
    (BMP, TIFF, PPM/PGM) and as a fallback. Grey, palette and RGBA images become RGB; 16-bit PNGs are scaled
    to 8 bits; animated images give their first frame; EXIF orientation is not applied (as ImageFolder)."""
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


# ---- the split object ----------------------------------------------------------------------------

class LazyImages(Sequence):
    """`images[i]` decodes file i (uint8 RGB, 3 x H x W) when asked, in whichever process asks."""

    def __init__(self, root: Path, files: list[str], labels: list[int]) -> None:
        self.root, self.files, self._labels = root, files, labels
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("LazyImages supports integer indices only; use FolderSplit.subset")
        n = len(self.files)
        i = int(i) % n if i < 0 else int(i)
        label = self._labels[i]
        # Safety net: a file that passed the load-time check but fails now is replaced by the next image of
        # the same class (same label), with its path logged once per process. Never a crash in a worker.
        for step in range(n):
            j = (i + step) % n
            if self._labels[j] != label:
                continue
            try:
                return decode(self.path(j))
            except Exception as err:  # noqa: BLE001 - any decode failure is handled the same way
                if j not in self._warned:
                    self._warned.add(j)
                    log.warning("cannot decode %s (%s): using another image of class %s instead",
                                self.path(j), str(err).splitlines()[-1][-200:], label)
        raise RuntimeError(f"no image of class {label} under {self.root} can be decoded any more "
                           f"(first: {self.path(i)}); the data changed on disk during the run")


class FolderSplit:
    """One split of an image folder: lazy `.images`, int64 `.labels`, `.classes`, `.files` relative to
    `.root` (each `<class>/...`). Works with `dtl.data.WorkerLoader` like an in-memory `dtl.cifar.Split`."""

    def __init__(self, root: Path, files: list[str], labels: list[int], classes: list[str],
                 source: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.files = list(files)
        self.classes = list(classes)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.images = LazyImages(self.root, self.files, list(labels))
        #: how the split was made (data_dir, layout, seed, val_split, skipped files), for `save_split`
        self.source = source if source is not None else {}

    def __len__(self) -> int:
        return len(self.files)

    def paths(self) -> list[Path]:
        return [self.root / f for f in self.files]

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def subset(self, n: int | None, order: str = "first", seed: int = 0) -> FolderSplit:
        """The first n images, or a seeded random n (kept in file order), like `Split.subset`."""
        if n is None or n >= len(self):
            return self
        if order == "first":
            idx = list(range(n))
        else:
            idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
            idx = idx.tolist()
        labels = self.labels.tolist()
        return FolderSplit(self.root, [self.files[i] for i in idx], [labels[i] for i in idx], self.classes,
                           self.source)

    def with_classes(self, classes: list[str]) -> FolderSplit:
        """The same images labelled by their index in `classes` (e.g. a checkpoint's class list)."""
        missing = [c for c in self.classes if c not in classes]
        if missing:
            raise UserError(f"{self.root} has class folder(s) the model does not know: "
                            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; "
                            f"it knows {', '.join(classes[:20])}"
                            f"{' ...' if len(classes) > 20 else ''}")
        remap = [classes.index(c) for c in self.classes]
        return FolderSplit(self.root, self.files, [remap[lab] for lab in self.labels.tolist()], classes,
                           self.source)

    def __repr__(self) -> str:
        return f"FolderSplit({self.root}, {len(self)} images, {len(self.classes)} classes)"


# ---- finding files -------------------------------------------------------------------------------

def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _walk_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively (following links), hidden entries skipped, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(f))
    return sorted(found)


def class_folders(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def list_classes(root: Path) -> tuple[list[str], list[str], list[int]]:
    """(classes, files relative to root, labels) of a folder of class folders."""
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    classes = class_folders(root)
    if not classes:
        raise UserError(f"{root} has no class folders: expected {root}/<class>/<image files> (or train/ and "
                        "val/ folders holding class folders)")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for path in _walk_images(root / name):
            files.append(path.relative_to(root).as_posix())
            labels.append(label)
    if not files:
        raise UserError(f"{root} has class folders ({', '.join(classes[:10])}) but no image files "
                        f"({', '.join(IMG_EXTENSIONS)}) in them")
    counts = torch.bincount(torch.tensor(labels), minlength=len(classes)).tolist()
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        _warn("class folder(s) without image files under %s: %s", root, ", ".join(empty))
    return classes, files, labels


def find_layout(data_dir: Path) -> tuple[str, Path, Path | None]:
    """("train_val", train root, val root) | ("split", class root, None)."""
    train = data_dir / "train"
    val = next((data_dir / v for v in VAL_DIRS if (data_dir / v).is_dir()), None)
    if train.is_dir() and val is not None:
        return "train_val", train, val
    if train.is_dir():
        return "split", train, None
    return "split", data_dir, None


# ---- splitting -----------------------------------------------------------------------------------

def _class_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def stratified_split(labels: Sequence[int], classes: Sequence[str], fraction: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices), both sorted. Each class keeps round(fraction x n) images for val (at
    least 1 and at most n - 1 when n >= 2), picked by a generator seeded from (seed, class name): adding a
    class or an image to one class does not reshuffle the others."""
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(int(lab), []).append(i)
    train: list[int] = []
    val: list[int] = []
    for lab, idx in by_class.items():
        n = len(idx)
        k = round(n * fraction)
        k = min(max(k, 1), n - 1) if (fraction > 0 and n >= 2) else (0 if n < 2 else k)
        shuffled = list(idx)
        random.Random(_class_seed(seed, classes[lab])).shuffle(shuffled)
        val.extend(shuffled[:k])
        train.extend(shuffled[k:])
    return sorted(train), sorted(val)


# ---- reporting -----------------------------------------------------------------------------------

def _is_main() -> bool:
    try:
        import torch.distributed as tdist

        return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0
    except (RuntimeError, ValueError):
        return True


def _warn(msg: str, *args: Any) -> None:
    """Warnings once per job (rank 0), not once per rank."""
    (log.warning if _is_main() else log.debug)(msg, *args)


def _drop_bad(root: Path, files: list[str], labels: list[int], strict: bool,
              what: str) -> tuple[list[str], list[int], list[str]]:
    """Scan the files; refuse (strict) or drop the unreadable ones, naming each."""
    bad = scan([str(root / f) for f in files])
    if not bad:
        return files, labels, []
    listing = "\n  ".join(f"{p} ({reason})" for p, reason in sorted(bad.items()))
    if strict:
        raise UserError(f"{len(bad)} unreadable image file(s) in {what} (--strict-images):\n  {listing}\n"
                        "fix or remove them, or drop --strict-images to skip them with a warning")
    _warn("skipping %d unreadable image file(s) in %s:\n  %s", len(bad), what, listing)
    keep = [i for i, f in enumerate(files) if str(root / f) not in bad]
    skipped = [f for f in files if str(root / f) in bad]
    return [files[i] for i in keep], [labels[i] for i in keep], skipped


# ---- the split file ------------------------------------------------------------------------------

def _rel(path: Path, data_dir: Path) -> str:
    try:
        return path.resolve().relative_to(data_dir.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def save_split(outdir: str | Path, splits: Splits) -> Path | None:
    """Write OUTDIR/split.json (rank 0 only): the files of each split, relative to the data folder, so a
    resume or `dtl eval` uses exactly the same images. No-op (None) for in-memory data sets."""
    train, test = splits.train, splits.test
    if not (isinstance(train, FolderSplit) and isinstance(test, FolderSplit)):
        return None
    from dtl.checkpoint import write_json

    src = train.source
    data_dir = Path(src.get("data_dir", train.root))
    payload = {
        "format": SPLIT_FORMAT, "version": SPLIT_VERSION, "data_dir": str(data_dir.resolve()),
        "layout": src.get("layout"), "val_split": src.get("val_split"), "seed": src.get("seed"),
        "classes": train.classes,
        "train": {"root": _rel(train.root, data_dir), "files": train.files},
        "val": {"root": _rel(test.root, data_dir), "files": test.files},
        "skipped": src.get("skipped", []),
    }
    path = Path(outdir) / SPLIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, payload)
    return path


def read_split(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable split file ({err}); delete it to split again") from None
    if (not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT
            or data.get("version") != SPLIT_VERSION):
        raise UserError(f"{path} is not a {SPLIT_FORMAT} version {SPLIT_VERSION} file")
    for key in ("classes", "train", "val"):
        if key not in data:
            raise UserError(f"{path} lacks the {key!r} entry")
    return data


def saved_split_path(cfg: Config) -> Path | None:
    """Where a resumed run's split file is (None for a fresh run: it splits anew)."""
    if not cfg.resume:
        return None
    if cfg.output_dir:
        return Path(cfg.output_dir) / SPLIT_FILE
    if cfg.resume == "auto":
        return None
    path = Path(cfg.resume)
    run = path.parent.parent if path.parent.name == "checkpoints" else path
    return run / SPLIT_FILE


def _labels_of(files: list[str], classes: list[str], where: Path) -> list[int]:
    index = {c: i for i, c in enumerate(classes)}
    labels = []
    for f in files:
        cls = f.split("/", 1)[0]
        if cls not in index:
            raise UserError(f"{where}: {f} is not under a known class folder")
        labels.append(index[cls])
    return labels


# ---- entry points --------------------------------------------------------------------------------

def load_folder_splits(cfg: Config, split_file: Path | None = None, *, with_train: bool = True) -> Splits:
    """Train and held-out splits of the image folder `cfg.data_dir` (see the module docstring), with
    `cfg.train_subset`/`cfg.eval_subset` applied. `split_file`: a saved split to reuse (default: the run
    folder's when resuming). `with_train=False` (evaluation) leaves the train split empty and unscanned."""
    if cfg.data_pipeline == "device":
        raise UserError("--data-pipeline device holds a whole split in memory as one tensor, which image "
                        "folders (files of any size) cannot be; use --data-pipeline workers (or auto)")
    data_dir = Path(cfg.data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder: --dataset folder expects "
                        "DATA_DIR/<class>/... or DATA_DIR/train/<class>/... with DATA_DIR/val/<class>/...")
    split_file = split_file if split_file is not None else saved_split_path(cfg)
    if split_file is not None and split_file.is_file():
        return _from_saved(cfg, data_dir, split_file, with_train)
    layout, train_root, val_root = find_layout(data_dir)
    source: dict[str, Any] = {"data_dir": str(data_dir), "layout": layout, "seed": cfg.seed,
                              "val_split": cfg.val_split}
    classes, files, labels = list_classes(train_root)
    if layout == "train_val":
        if cfg.val_split:
            _warn("--val-split %s ignored: %s has its own held-out folder %s", cfg.val_split, data_dir,
                  val_root.name)
        val_classes, vfiles, vlabels = list_classes(val_root)
        unknown = [c for c in val_classes if c not in classes]
        if unknown:
            raise UserError(f"{val_root} has class folder(s) that {train_root} lacks: "
                            f"{', '.join(unknown[:10])}")
        remap = [classes.index(c) for c in val_classes]
        vlabels = [remap[lab] for lab in vlabels]
        vfiles, vlabels, vbad = _drop_bad(val_root, vfiles, vlabels, cfg.strict_images, str(val_root))
        tbad: list[str] = []
        if with_train:
            files, labels, tbad = _drop_bad(train_root, files, labels, cfg.strict_images, str(train_root))
        source["skipped"] = [_rel(train_root / f, data_dir) for f in tbad] + \
                            [_rel(val_root / f, data_dir) for f in vbad]
        train = FolderSplit(train_root, files if with_train else [], labels if with_train else [], classes,
                            source)
        test = FolderSplit(val_root, vfiles, vlabels, classes, source)
    else:
        if not cfg.val_split:
            raise UserError(f"{data_dir} has no val/ folder (nor {', '.join(VAL_DIRS[1:])}/): pass "
                            "--val-split 0.1 to hold out a seeded, stratified 10% of each class for "
                            "evaluation")
        files, labels, bad = _drop_bad(train_root, files, labels, cfg.strict_images, str(train_root))
        source["skipped"] = [_rel(train_root / f, data_dir) for f in bad]
        tidx, vidx = stratified_split(labels, classes, cfg.val_split, cfg.seed)
        train = FolderSplit(train_root, [files[i] for i in tidx] if with_train else [],
                            [labels[i] for i in tidx] if with_train else [], classes, source)
        test = FolderSplit(train_root, [files[i] for i in vidx], [labels[i] for i in vidx], classes, source)
    return _finish(cfg, train, test, with_train)


def _from_saved(cfg: Config, data_dir: Path, split_file: Path, with_train: bool) -> Splits:
    data = read_split(split_file)
    classes = [str(c) for c in data["classes"]]
    log.info("using the saved image split %s", split_file)
    source = {k: data.get(k) for k in ("layout", "seed", "val_split")}
    source.update(data_dir=str(data_dir), skipped=list(data.get("skipped") or []))
    out = []
    for key in ("train", "val"):
        entry = data[key]
        root = data_dir / entry["root"] if entry.get("root") else data_dir
        files = [str(f) for f in entry["files"]] if (key == "val" or with_train) else []
        labels = _labels_of(files, classes, split_file)
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            listing = "\n  ".join(str(root / f) for f in missing[:20])
            more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise UserError(f"{len(missing)} file(s) listed in {split_file} are missing under {data_dir}:\n  "
                            f"{listing}{more}\n(--data-dir must be the folder the run was trained on)")
        files, labels, bad = _drop_bad(root, files, labels, cfg.strict_images, str(root))
        source["skipped"] += [_rel(root / f, data_dir) for f in bad]
        out.append(FolderSplit(root, files, labels, classes, source))
    return _finish(cfg, out[0], out[1], with_train)


def _finish(cfg: Config, train: FolderSplit, test: FolderSplit, with_train: bool) -> Splits:
    if with_train and not len(train):
        raise UserError(f"{cfg.data_dir}: no readable training images")
    if not len(test):
        raise UserError(f"{cfg.data_dir}: the held-out split is empty (each class needs at least 2 images "
                        "for --val-split, or put images in val/<class>/)")
    log.info("image folder %s: %d train / %d held-out images, %d classes", cfg.data_dir, len(train),
             len(test), len(train.classes))
    return Splits(train.subset(cfg.train_subset, cfg.subset_order, cfg.seed),
                  test.subset(cfg.eval_subset, cfg.subset_order, cfg.seed + 1))


def eval_root(data_dir: Path) -> Path:
    """The folder of class folders to evaluate on in `data_dir`: its val/ (validation/, valid/, test/)
    folder when that holds class folders, else `data_dir` itself."""
    for name in VAL_DIRS:
        candidate = data_dir / name
        if candidate.is_dir() and class_folders(candidate):
            return candidate
    return data_dir


def load_image_folder(root: str | Path, strict: bool = False) -> FolderSplit:
    """Every image of a folder of class folders as one split (e.g. to evaluate on a new labelled folder)."""
    root = Path(root)
    classes, files, labels = list_classes(root)
    files, labels, bad = _drop_bad(root, files, labels, strict, str(root))
    if not files:
        raise UserError(f"{root}: no readable images")
    return FolderSplit(root, files, labels, classes, {"data_dir": str(root), "layout": "all",
                                                      "skipped": bad})


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files given as such (any extension) and the image files under folders given (recursive, sorted)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(_walk_images(path))
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return found


def eval_transform(size: int):  # noqa: ANN201 - a torchvision v2 Compose
    """The pretrained backbones' eval preprocessing on uint8 tensors: Resize(size) (shorter side) +
    CenterCrop(size) + ToDtype(float, scale) + Normalize(ImageNet mean/std). A square input (CIFAR) is
    exactly `dtl.data.v2_transform(False, size, False)`."""
    from torchvision.transforms import v2

    from dtl.augment import IMAGENET_MEAN, IMAGENET_STD

    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
