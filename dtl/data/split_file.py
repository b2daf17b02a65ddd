"""The saved image split, ``OUTDIR/split.json``: the files of each split of an image folder, relative to the data
folder, so that a resumed run (or `dtl eval` / `dtl export` of the run) uses exactly the same images instead of
splitting again. Written once by rank 0 (`save_split`), read back by `dtl.data.folder.load_folder_splits`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dtl.atomic_files import write_json
from dtl.data.folder_split import FolderSplit
from dtl.data.splits import Splits
from dtl.errors import UserError

SPLIT_FILE = "split.json"
SPLIT_FORMAT = "dtl-folder-split"
SPLIT_VERSION = 1


def recorded_path(path: Path, data_dir: Path) -> str:
    """`path` as the split file records it: relative to `data_dir` when under it, else absolute."""
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
        "train": {"root": recorded_path(train.root, data_dir), "files": train.files},
        "val": {"root": recorded_path(test.root, data_dir), "files": test.files},
        "skipped": src.get("skipped", []),
    }
    path = Path(outdir) / SPLIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, payload)
    return path


def read_split(path: Path) -> dict[str, Any]:
    """A split file's contents, checked: readable, this format and version, with classes, train and val."""
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


def labels_of(files: list[str], classes: list[str], where: Path) -> list[int]:
    """The label of each listed file (`<class>/...`), refusing one under no known class folder."""
    index = {c: i for i, c in enumerate(classes)}
    stray = next((f for f in files if f.split("/", 1)[0] not in index), None)
    if stray is not None:
        raise UserError(f"{where}: {stray} is not under a known class folder")
    return [index[f.split("/", 1)[0]] for f in files]
