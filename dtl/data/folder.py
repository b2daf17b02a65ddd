"""Image folders (`--dataset folder`): torchvision's ImageFolder layout, decoded lazily by DataLoader workers.

Accepted layouts of ``--data-dir DATA_DIR`` (class names are the sorted names of the class folders; hidden
folders and files, e.g. ``.ipynb_checkpoints``, are ignored; class folders are searched recursively)::

    DATA_DIR/train/<class>/*.jpg  +  DATA_DIR/val/<class>/*.jpg    (or validation/, valid/, test/)
    DATA_DIR/train/<class>/*.jpg                                    held-out part: --val-split
    DATA_DIR/<class>/*.jpg                                          held-out part: --val-split

With ``--val-split F`` each class keeps round(F x its images) for evaluation (at least one, never all,
when it has two or more), chosen by a generator seeded with `dtl.splits.stream_seed(--seed, class name)`:
stratified and reproducible. The split is saved as ``OUTDIR/split.json`` (paths relative to DATA_DIR, see
`save_split`), and a resumed run (or `dtl eval` of the run) reads it back instead of splitting again: its
caller, which knows the run folder, passes that file as `load_folder_splits(..., split_file=)`.

Every file is checked once at load time (`dtl.images.scan`). Unreadable files are listed by path and
skipped, or refused with `--strict-images`. Should a file still fail to decode in a worker later (changed
on disk, or damaged in a way the check cannot see), the worker logs its path and uses the next image of the
same class instead of crashing the run. Warnings are logged once per job: by the process the caller
marks `is_main` (the others log them at debug level).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dtl.atomic_files import write_json
from dtl.config import Config
from dtl.data.images import IMG_EXTENSIONS, decode, scan, walk_images
from dtl.data.splits import Splits, apply_subsets, stream_seed, subset_indices
from dtl.errors import UserError

log = logging.getLogger("dtl")

#: Folder names accepted as the held-out split next to train/, in order of preference.
VAL_DIRS = ("val", "validation", "valid", "test")
SPLIT_FILE = "split.json"
SPLIT_FORMAT = "dtl-folder-split"
SPLIT_VERSION = 1


# ---- the split object ----------------------------------------------------------------------------

class LazyImages(Sequence):
    """`images[i]` decodes file i (uint8 RGB, 3 x H x W) when asked, in whichever process asks."""

    def __init__(self, root: Path, files: list[str], labels: list[int], decoder: str = "auto") -> None:
        self.root, self.files, self._labels = root, files, labels
        self.decoder = decoder  # --image-decoder
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
                return decode(self.path(j), self.decoder)
            except Exception as err:  # noqa: BLE001 - any decode failure is handled the same way
                if j not in self._warned:
                    self._warned.add(j)
                    log.warning("cannot decode %s (%s): using another image of class %s instead",
                                self.path(j), str(err).splitlines()[-1][-200:], label)
        raise RuntimeError(f"no image of class {label} under {self.root} can be decoded any more "
                           f"(first: {self.path(i)}); the data changed on disk during the run")


class FolderSplit:
    """One split of an image folder: lazy `.images`, int64 `.labels`, `.classes`, `.files` relative to
    `.root` (each `<class>/...`). Works with `dtl.data.WorkerLoader` like an in-memory `dtl.splits.Split`.
    Served from its decoded-image cache (`with_images`, see `dtl.data.image_cache`), `.images` is one
    (N, 3, S, S) uint8 tensor instead, which the device pipeline takes as it takes CIFAR's."""

    def __init__(self, root: Path, files: list[str], labels: list[int], classes: list[str],
                 source: dict[str, Any] | None = None, images: torch.Tensor | None = None,
                 decoder: str = "auto") -> None:
        self.root = Path(root)
        self.files = list(files)
        self.classes = list(classes)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        #: --image-decoder, for the files (LazyImages, the decode pipeline, the cache's first build)
        self.decoder = decoder
        self.images: LazyImages | torch.Tensor = (LazyImages(self.root, self.files, list(labels), decoder)
                                                  if images is None else images)
        #: how the split was made (data_dir, layout, seed, val_split, skipped files), for `save_split`
        self.source = source if source is not None else {}

    def __len__(self) -> int:
        return len(self.files)

    def paths(self) -> list[Path]:
        return [self.root / f for f in self.files]

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def subset(self, n: int | None, order: str = "first", seed: int = 0) -> FolderSplit:
        """The first n images, a seeded random n or a stratified n (kept in file order); see
        `dtl.splits.subset_indices`."""
        idx = subset_indices(len(self), n, order, seed, self.labels.tolist(), self.classes)
        if idx is None:
            return self
        labels = self.labels.tolist()
        rows = self.images[torch.tensor(idx, dtype=torch.int64)] if isinstance(self.images, torch.Tensor) else None
        return FolderSplit(self.root, [self.files[i] for i in idx], [labels[i] for i in idx], self.classes,
                           self.source, rows, self.decoder)

    def with_decoder(self, decoder: str) -> FolderSplit:
        """The same split decoded by `decoder` (--image-decoder)."""
        images = self.images if isinstance(self.images, torch.Tensor) else None
        return FolderSplit(self.root, self.files, self.labels.tolist(), self.classes, self.source, images, decoder)

    def with_images(self, images: torch.Tensor) -> FolderSplit:
        """The same split served from decoded images (row i: file i), e.g. its cache."""
        if images.shape[0] != len(self):
            raise ValueError(f"{images.shape[0]} images for a split of {len(self)} files")
        return FolderSplit(self.root, self.files, self.labels.tolist(), self.classes, self.source, images,
                           self.decoder)

    def with_classes(self, classes: list[str]) -> FolderSplit:
        """The same images labelled by their index in `classes` (e.g. a checkpoint's class list)."""
        missing = [c for c in self.classes if c not in classes]
        if missing:
            raise UserError(f"{self.root} has class folder(s) the model does not know: "
                            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; "
                            f"it knows {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}")
        remap = [classes.index(c) for c in self.classes]
        return FolderSplit(self.root, self.files, [remap[lab] for lab in self.labels.tolist()], classes,
                           self.source, self.images if isinstance(self.images, torch.Tensor) else None, self.decoder)

    def __repr__(self) -> str:
        return f"FolderSplit({self.root}, {len(self)} images, {len(self.classes)} classes)"


# ---- finding class folders -----------------------------------------------------------------------

def class_folders(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def list_classes(root: Path, is_main: bool = True) -> tuple[list[str], list[str], list[int]]:
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
        for path in walk_images(root / name):
            files.append(path.relative_to(root).as_posix())
            labels.append(label)
    if not files:
        raise UserError(f"{root} has class folders ({', '.join(classes[:10])}) but no image files "
                        f"({', '.join(IMG_EXTENSIONS)}) in them")
    counts = torch.bincount(torch.tensor(labels), minlength=len(classes)).tolist()
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        _warn(is_main, "class folder(s) without image files under %s: %s", root, ", ".join(empty))
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
        random.Random(stream_seed(seed, classes[lab])).shuffle(shuffled)
        val.extend(shuffled[:k])
        train.extend(shuffled[k:])
    return sorted(train), sorted(val)


# ---- reporting -----------------------------------------------------------------------------------

def _warn(is_main: bool, msg: str, *args: Any) -> None:
    """Warnings once per job (the main process), not once per rank."""
    (log.warning if is_main else log.debug)(msg, *args)


def _drop_bad(root: Path, files: list[str], labels: list[int], strict: bool, what: str,
              is_main: bool = True) -> tuple[list[str], list[int], list[str]]:
    """Scan the files; refuse (strict) or drop the unreadable ones, naming each."""
    bad = scan([str(root / f) for f in files])
    if not bad:
        return files, labels, []
    listing = "\n  ".join(f"{p} ({reason})" for p, reason in sorted(bad.items()))
    if strict:
        raise UserError(f"{len(bad)} unreadable image file(s) in {what} (--strict-images):\n  {listing}\n"
                        "fix or remove them, or drop --strict-images to skip them with a warning")
    _warn(is_main, "skipping %d unreadable image file(s) in %s:\n  %s", len(bad), what, listing)
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


def _labels_of(files: list[str], classes: list[str], where: Path) -> list[int]:
    index = {c: i for i, c in enumerate(classes)}
    stray = next((f for f in files if f.split("/", 1)[0] not in index), None)
    if stray is not None:
        raise UserError(f"{where}: {stray} is not under a known class folder")
    return [index[f.split("/", 1)[0]] for f in files]


# ---- entry points --------------------------------------------------------------------------------

def load_folder_splits(cfg: Config, split_file: Path | None = None, *, with_train: bool = True,
                       is_main: bool = True) -> Splits:
    """Train and held-out splits of the image folder `cfg.data.data_dir` (see the module docstring), with
    `cfg.data.train_subset`/`cfg.data.eval_subset` applied. `split_file`: a saved split to reuse (a resumed run's
    OUTDIR/split.json, resolved by the caller); None, or a file that does not exist, splits anew.
    `with_train=False` (evaluation) leaves the train split empty and unscanned. `is_main`: whether this
    process logs the warnings (the others log them at debug level)."""
    if cfg.data.data_pipeline == "device" and cfg.data.cache_images is None:
        raise UserError("--data-pipeline device holds a whole split in memory as one tensor, which image "
                        "folders (files of any size) are only once decoded: add --cache-images, or use "
                        "--data-pipeline workers/decode (or auto)")
    data_dir = Path(cfg.data.data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder: --dataset folder expects "
                        "DATA_DIR/<class>/... or DATA_DIR/train/<class>/... with DATA_DIR/val/<class>/...")
    layout, train_root, val_root = find_layout(data_dir)
    source: dict[str, Any] = {"data_dir": str(data_dir), "layout": layout, "seed": cfg.run.seed,
                              "val_split": cfg.data.val_split}
    if split_file is not None and split_file.is_file():
        train, test = _from_saved(cfg, data_dir, split_file, with_train, is_main)
    elif val_root is not None:
        train, test = _train_and_val(cfg, train_root, val_root, source, with_train, is_main)
    else:
        train, test = _held_out(cfg, train_root, source, with_train, is_main)
    return _finish(cfg, train, test, with_train)


def _train_and_val(cfg: Config, train_root: Path, val_root: Path, source: dict[str, Any], with_train: bool,
                   is_main: bool) -> tuple[FolderSplit, FolderSplit]:
    """DATA_DIR/train/ and DATA_DIR/val/ (or validation/, ...): the held-out folder is the test split."""
    data_dir = Path(cfg.data.data_dir)
    classes, files, labels = list_classes(train_root, is_main)
    if cfg.data.val_split:
        _warn(is_main, "--val-split %s ignored: %s has its own held-out folder %s", cfg.data.val_split, data_dir,
              val_root.name)
    val_classes, vfiles, vlabels = list_classes(val_root, is_main)
    unknown = [c for c in val_classes if c not in classes]
    if unknown:
        raise UserError(f"{val_root} has class folder(s) that {train_root} lacks: {', '.join(unknown[:10])}")
    remap = [classes.index(c) for c in val_classes]
    vlabels = [remap[lab] for lab in vlabels]
    vfiles, vlabels, vbad = _drop_bad(val_root, vfiles, vlabels, cfg.data.strict_images, str(val_root), is_main)
    tbad: list[str] = []
    if with_train:
        files, labels, tbad = _drop_bad(train_root, files, labels, cfg.data.strict_images, str(train_root), is_main)
    source["skipped"] = [_rel(train_root / f, data_dir) for f in tbad] + \
                        [_rel(val_root / f, data_dir) for f in vbad]
    train = FolderSplit(train_root, files if with_train else [], labels if with_train else [], classes, source)
    return train, FolderSplit(val_root, vfiles, vlabels, classes, source)


def _held_out(cfg: Config, root: Path, source: dict[str, Any], with_train: bool,
              is_main: bool) -> tuple[FolderSplit, FolderSplit]:
    """One folder of class folders: `--val-split` of each class is held out (`stratified_split`)."""
    data_dir = Path(cfg.data.data_dir)
    classes, files, labels = list_classes(root, is_main)
    if not cfg.data.val_split:
        raise UserError(f"{data_dir} has no val/ folder (nor {', '.join(VAL_DIRS[1:])}/): pass "
                        "--val-split 0.1 to hold out a seeded, stratified 10% of each class for evaluation")
    files, labels, bad = _drop_bad(root, files, labels, cfg.data.strict_images, str(root), is_main)
    source["skipped"] = [_rel(root / f, data_dir) for f in bad]
    tidx, vidx = stratified_split(labels, classes, cfg.data.val_split, cfg.run.seed)
    train = FolderSplit(root, [files[i] for i in tidx] if with_train else [],
                        [labels[i] for i in tidx] if with_train else [], classes, source)
    return train, FolderSplit(root, [files[i] for i in vidx], [labels[i] for i in vidx], classes, source)


def _from_saved(cfg: Config, data_dir: Path, split_file: Path, with_train: bool,
                is_main: bool) -> tuple[FolderSplit, FolderSplit]:
    """The splits listed in a saved split file, every listed file still there and checked again."""
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
        files, labels, bad = _drop_bad(root, files, labels, cfg.data.strict_images, str(root), is_main)
        source["skipped"] += [_rel(root / f, data_dir) for f in bad]
        out.append(FolderSplit(root, files, labels, classes, source))
    return out[0], out[1]


def _finish(cfg: Config, train: FolderSplit, test: FolderSplit, with_train: bool) -> Splits:
    if with_train and not len(train):
        raise UserError(f"{cfg.data.data_dir}: no readable training images")
    if not len(test):
        raise UserError(f"{cfg.data.data_dir}: the held-out split is empty (each class needs at least 2 images "
                        "for --val-split, or put images in val/<class>/)")
    log.info("image folder %s: %d train / %d held-out images, %d classes", cfg.data.data_dir, len(train),
             len(test), len(train.classes))
    decoder = cfg.data.image_decoder
    return apply_subsets(train.with_decoder(decoder), test.with_decoder(decoder), cfg.data.train_subset,
                         cfg.data.eval_subset, cfg.data.subset_order, cfg.run.seed)


def eval_root(data_dir: Path) -> Path:
    """The folder of class folders to evaluate on in `data_dir`: its val/ (validation/, valid/, test/)
    folder when that holds class folders, else `data_dir` itself."""
    for name in VAL_DIRS:
        candidate = data_dir / name
        if candidate.is_dir() and class_folders(candidate):
            return candidate
    return data_dir


def load_image_folder(root: str | Path, strict: bool = False, is_main: bool = True) -> FolderSplit:
    """Every image of a folder of class folders as one split (e.g. to evaluate on a new labelled folder)."""
    root = Path(root)
    classes, files, labels = list_classes(root, is_main)
    files, labels, bad = _drop_bad(root, files, labels, strict, str(root), is_main)
    if not files:
        raise UserError(f"{root}: no readable images")
    return FolderSplit(root, files, labels, classes, {"data_dir": str(root), "layout": "all",
                                                      "skipped": bad})
