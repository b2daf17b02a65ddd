"""CIFAR-10/100 on disk: the official python-pickle and binary layouts, the archives, the download, and a
writer for small learnable CIFAR-format sets (`dtl data synth`).

We do not use torchvision.datasets.CIFAR10 for reading: it refuses any file whose md5 differs from the
official one (so no subsets or generated sets) and it calls a plain `pickle.load` on whatever is there.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dtl.data.splits import Split
from dtl.errors import UserError

URL_BASE = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class Layout:
    """One official on-disk layout of one CIFAR data set."""

    folder: str
    archive: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int = 1  # binary format: bytes of labels before each 3072-byte image


CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
LAYOUTS: dict[str, dict[str, Layout]] = {
    "cifar10": {
        "py": Layout("cifar-10-batches-py", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                     tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",)),
        "bin": Layout("cifar-10-batches-bin", "cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530",
                      tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",)),
    },
    "cifar100": {
        "py": Layout("cifar-100-python", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e13ef6b3c4e20",
                     ("train",), ("test",)),
        "bin": Layout("cifar-100-binary", "cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8",
                      ("train.bin",), ("test.bin",), label_bytes=2),
    },
}


# ---- reading -------------------------------------------------------------------------------------

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles the official CIFAR batches (dicts, lists, bytes and numpy arrays) and nothing else: any other
    global (os.system, builtins.eval, ...) is refused before it can run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # python-2 pickles store byte strings through it
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - signature fixed by pickle
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch")


def safe_unpickle(path: Path) -> dict:
    try:
        data = RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise UserError(f"{path} is not a valid CIFAR python batch ({err}); re-extract the official archive "
                        "or regenerate it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a valid CIFAR python batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _label_key(dataset: str, coarse: bool) -> str:
    if dataset == "cifar10":
        return "labels"
    return "coarse_labels" if coarse else "fine_labels"


def _read_py(path: Path, dataset: str, coarse: bool) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_unpickle(path)
    key = _label_key(dataset, coarse)
    if "data" not in batch or key not in batch:
        raise UserError(f"{path} lacks the '{key}' or 'data' entry of a {dataset} batch")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise UserError(f"{path} holds data of shape {data.shape} for {labels.shape[0]} labels; "
                        "expected (N, 3072): the file is truncated or not a CIFAR batch")
    return data, labels


def _read_bin(path: Path, label_bytes: int, coarse: bool) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + 3072
    if raw.size == 0 or raw.size % record:
        raise UserError(f"{path} has {raw.size} bytes, not a multiple of the {record}-byte CIFAR record: "
                        "the file is truncated; re-extract the official archive")
    raw = raw.reshape(-1, record)
    label_col = 0 if (label_bytes == 1 or coarse) else 1
    return raw[:, label_bytes:], raw[:, label_col].astype(np.int64)


def _class_names(root: Path, dataset: str, fmt: str, coarse: bool, num_classes: int) -> list[str]:
    if dataset == "cifar10":
        return list(CIFAR10_NAMES)
    if fmt == "py" and (root / "meta").is_file():
        meta = safe_unpickle(root / "meta")
        key = "coarse_label_names" if coarse else "fine_label_names"
        if key in meta:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]
    txt = root / ("coarse_label_names.txt" if coarse else "fine_label_names.txt")
    if txt.is_file():
        return [line.strip() for line in txt.read_text().splitlines() if line.strip()]
    return [str(i) for i in range(num_classes)]


def find_layout(data_dir: Path, dataset: str) -> tuple[str, Path] | None:
    """The extracted layout present in data_dir, extracting an official archive found there if needed."""
    for fmt, layout in LAYOUTS[dataset].items():
        if (data_dir / layout.folder).is_dir():
            return fmt, data_dir / layout.folder
    for fmt, layout in LAYOUTS[dataset].items():
        if (data_dir / layout.archive).is_file():
            extract(data_dir / layout.archive, data_dir)
            if (data_dir / layout.folder).is_dir():
                return fmt, data_dir / layout.folder
    return None


def extract(archive: Path, dest: Path) -> None:
    """Extract a .tar.gz, refusing members that would land outside `dest` (absolute paths, '..', links)."""
    try:
        with tarfile.open(archive) as tar:
            root = dest.resolve()
            for member in tar.getmembers():
                target = (dest / member.name).resolve()
                if not (member.isfile() or member.isdir()) or root not in (target, *target.parents):
                    raise UserError(f"{archive}: refusing suspicious archive member {member.name!r}")
            tar.extractall(dest)  # noqa: S202 - every member was checked above
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"{archive} is not a readable .tar.gz ({err}); delete it and download again") from None


def download(data_dir: Path, dataset: str) -> None:
    """Fetch and extract the official python archive (md5-checked by torchvision's utility)."""
    from torchvision.datasets.utils import download_and_extract_archive

    layout = LAYOUTS[dataset]["py"]
    try:
        download_and_extract_archive(URL_BASE + layout.archive, str(data_dir), md5=layout.md5)
    except Exception as err:  # noqa: BLE001 - URLError, socket errors, md5 mismatch: all mean "do it by hand"
        raise UserError(
            f"could not download {URL_BASE + layout.archive} ({type(err).__name__}: {err}).\n"
            f"On a machine without internet, copy {layout.archive} (or the extracted {layout.folder}/ folder, "
            f"or the binary version's archive/folder) into {data_dir.resolve()} and run again with --no-download."
        ) from None


def load_cifar(data_dir: str | Path, dataset: str = "cifar10", allow_download: bool = False,
               coarse: bool = False) -> tuple[Split, Split]:
    """Both splits of CIFAR-10/100 from `data_dir` in any official layout."""
    root = Path(data_dir)
    found = find_layout(root, dataset)
    if found is None and allow_download:
        download(root, dataset)
        found = find_layout(root, dataset)
    if found is None:
        names = ", ".join(f"{lay.folder}/ or {lay.archive}" for lay in LAYOUTS[dataset].values())
        hint = "" if allow_download else " (or pass --download)"
        raise UserError(f"no {dataset} data in {root.resolve()}: expected one of {names}{hint}")
    fmt, folder = found
    layout = LAYOUTS[dataset][fmt]
    splits = []
    for files in (layout.train_files, layout.test_files):
        parts = []
        for name in files:
            path = folder / name
            if not path.is_file():
                raise UserError(f"{path} is missing: the {dataset} folder is incomplete; re-extract "
                                f"{layout.archive} into {root.resolve()}")
            parts.append(_read_py(path, dataset, coarse) if fmt == "py"
                         else _read_bin(path, layout.label_bytes, coarse))
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        splits.append((data, labels))
    num_classes = (10 if dataset == "cifar10" else 20 if coarse else 100)
    classes = _class_names(folder, dataset, fmt, coarse, num_classes)
    out = []
    for (data, labels), split_name in zip(splits, ("train", "test")):
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise UserError(f"{folder}: {split_name} labels range over [{labels.min()}, {labels.max()}] but "
                            f"{dataset} has {len(classes)} classes: the files are corrupt")
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        out.append(Split(images, torch.from_numpy(labels.copy()), classes))
    return out[0], out[1]


# ---- synthetic, learnable data ------------------------------------------------------------------

def make_synthetic(n: int, num_classes: int = 10, seed: int = 0, size: int = 32) -> Split:
    """A learnable CIFAR-like split: each class has its own background colour and a bright square in its own
    place, plus per-image colour jitter and pixel noise. Small models learn it in an epoch or two, yet it
    is not trivially separable pixel by pixel."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    palette = torch.rand(num_classes, 3, generator=torch.Generator().manual_seed(1234)) * 200 + 28
    colour = palette[labels] + (torch.rand(n, 3, generator=g) - 0.5) * 40
    images = colour[:, :, None, None].expand(n, 3, size, size).clone()
    cell = size // 4
    rows, cols = (labels % 4) * cell, (labels // 4 % 4) * cell
    ys = torch.arange(size)[None, :]
    in_rows = (ys >= rows[:, None]) & (ys < rows[:, None] + cell)
    in_cols = (ys >= cols[:, None]) & (ys < cols[:, None] + cell)
    square = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    images = torch.where(square, 255 - images, images)
    images += torch.randn(images.shape, generator=g) * 20
    names = list(CIFAR10_NAMES) if num_classes == 10 else [f"class_{i}" for i in range(num_classes)]
    return Split(images.clamp(0, 255).round().to(torch.uint8), labels.to(torch.int64), names)


def write_cifar10(out_dir: str | Path, train: Split, test: Split, fmt: str = "py") -> Path:
    """Write two splits in the official CIFAR-10 layout (`py` pickles or `bin` records); returns the folder."""
    layout = LAYOUTS["cifar10"][fmt]
    folder = Path(out_dir) / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train)), len(layout.train_files))
    parts = [(name, idx) for name, idx in zip(layout.train_files, chunks)]
    for name, idx in parts + [(layout.test_files[0], None)]:
        split = test if idx is None else train
        sel = torch.arange(len(split)) if idx is None else torch.from_numpy(idx)
        data = split.images[sel].reshape(len(sel), 3072).numpy()
        labels = split.labels[sel].numpy()
        if fmt == "py":
            payload = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data,
                       b"filenames": [f"{i}.png".encode() for i in range(len(sel))]}
            (folder / name).write_bytes(pickle.dumps(payload, protocol=2))
        else:
            records = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1)
            (folder / name).write_bytes(records.tobytes())
    meta = {b"label_names": [n.encode() for n in train.classes], b"num_cases_per_batch": 10000,
            b"num_vis": 3072}
    if fmt == "py":
        (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    else:
        (folder / "batches.meta.txt").write_text("\n".join(train.classes) + "\n")
    return folder
