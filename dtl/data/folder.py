"""Image folders (`--dataset folder`): torchvision's ImageFolder layout found, checked and split into the
train and held-out `FolderSplit`s (`dtl.data.folder_split`), decoded lazily by DataLoader workers.

Accepted layouts of ``--data-dir DATA_DIR`` (class names are the sorted names of the class folders; hidden
folders and files, e.g. ``.ipynb_checkpoints``, are ignored; class folders are searched recursively)::

    DATA_DIR/train/<class>/*.jpg  +  DATA_DIR/val/<class>/*.jpg    (or validation/, valid/, test/)
    DATA_DIR/train/<class>/*.jpg                                    held-out part: --val-split
    DATA_DIR/<class>/*.jpg                                          held-out part: --val-split

With ``--val-split F`` each class keeps round(F x its images) for evaluation (at least one, never all,
when it has two or more), chosen by `dtl.data.splits.stratified_split` (a generator seeded from --seed and the
class name): stratified and reproducible. The split is saved as ``OUTDIR/split.json``
(`dtl.data.split_file`), and a resumed run (or `dtl eval` of the run) reads it back instead of splitting again:
its caller, which knows the run folder, passes that file as `load_folder_splits(..., split_file=)`.

Every file is checked once at load time (`dtl.data.images.scan`). Unreadable files are listed by path and
skipped, or refused with `--strict-images`; a file that fails later, in a worker, is replaced there (see
`dtl.data.folder_split.LazyImages`). Warnings are logged once per job: by the process the caller marks
`is_main` (the others log them at debug level).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dtl.config import Config
from dtl.data.folder_split import FolderSplit
from dtl.data.images import IMG_EXTENSIONS, scan, walk_images
from dtl.data.split_file import labels_of, read_split, recorded_path
from dtl.data.splits import Splits, apply_subsets, stratified_split
from dtl.errors import UserError

log = logging.getLogger("dtl")

#: Folder names accepted as the held-out split next to train/, in order of preference.
VAL_DIRS = ("val", "validation", "valid", "test")


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


# ---- the load-time check -----------------------------------------------------------------------------

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
    source["skipped"] = [recorded_path(train_root / f, data_dir) for f in tbad] + \
                        [recorded_path(val_root / f, data_dir) for f in vbad]
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
    source["skipped"] = [recorded_path(root / f, data_dir) for f in bad]
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
        labels = labels_of(files, classes, split_file)
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            listing = "\n  ".join(str(root / f) for f in missing[:20])
            more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise UserError(f"{len(missing)} file(s) listed in {split_file} are missing under {data_dir}:\n  "
                            f"{listing}{more}\n(--data-dir must be the folder the run was trained on)")
        files, labels, bad = _drop_bad(root, files, labels, cfg.data.strict_images, str(root), is_main)
        source["skipped"] += [recorded_path(root / f, data_dir) for f in bad]
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
