"""Hugging Face data sets (`--dataset hf`, the optional extra ``pip install 'dtl[hf]'``): a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a folder of Parquet files, or a Hub data set
(``--data-dir hf://NAME`` or ``--hf-name NAME``, with ``--hf-config`` and ``--hf-revision``), read by the
`datasets` library into the train and held-out `dtl.data.hf_split.HFSplit`s.

- The Hub: `load_splits_once` runs this once per node first (its first process fetches into the HF cache, the
  others then read it). Offline (``HF_HUB_OFFLINE=1``, or no network) the data set comes from the cache: the
  `datasets` cache of an earlier `load_dataset`, else a snapshot of the data set's files that
  ``hf download --repo-type dataset NAME`` left in the hub cache. Neither there: a message says what to copy where.
- Columns: the image column is the one whose feature is `Image` (``--image-column`` to choose), the label
  column the one `ClassLabel` (its names are the classes), else a column named ``label`` or ``labels`` of
  integers; a column of strings only when ``--label-column`` names it (its sorted distinct values become the
  classes).
- Splits: ``--hf-train-split`` (train) trains; ``--hf-eval-split``, else the first of validation, val, valid, test,
  evaluates; with none, ``--val-split`` holds out a seeded, stratified part of the training split
  (`dtl.data.splits.stratified_split`, reproducible from --seed: `dtl eval` finds the same images).
- Every image is checked once at load time (`dtl.data.images.check_bytes`, in threads): an unreadable one stops
  the run with a message naming its rows, or is skipped and counted with ``--skip-bad-images``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dtl.config import Config
from dtl.data.hf_split import HFSplit, files_stamp, row_bytes
from dtl.data.images import check_bytes
from dtl.data.splits import Splits, apply_subsets, stratified_split
from dtl.errors import UserError

__all__ = ["EVAL_SPLITS", "HUB_PREFIX", "hub_name", "load_hf_splits", "open_dataset"]

log = logging.getLogger("dtl")

#: ``--data-dir hf://NAME``: a Hub data set
HUB_PREFIX = "hf://"
#: split names that evaluate when --hf-eval-split is not given, in order of preference (as image folders' val/)
EVAL_SPLITS = ("validation", "val", "valid", "test")
#: column names taken as labels when no column is a ClassLabel
LABEL_NAMES = ("label", "labels")
_SCAN_THREADS = 8
_SCAN_BATCH = 256
_LISTED = 10


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError("--dataset hf needs the `datasets` library: pip install 'dtl[hf]'") from None
    return datasets


def hub_name(cfg: Config) -> str | None:
    """The Hub data set a run reads (--hf-name, or --data-dir hf://NAME), or None for a local folder."""
    d = cfg.data
    if d.hf_name:
        return d.hf_name
    return d.data_dir[len(HUB_PREFIX):] if d.data_dir.startswith(HUB_PREFIX) else None


# ---- opening -------------------------------------------------------------------------------------

def open_dataset(cfg: Config) -> tuple[dict[str, Any], str]:
    """The data set's splits ({name: `datasets.Dataset`}) and where they come from (for messages)."""
    name = hub_name(cfg)
    found = _from_hub(name, cfg.data.hf_config, cfg.data.hf_revision) if name else _from_folder(Path(cfg.data.data_dir))
    datasets = _datasets()
    if isinstance(found, datasets.Dataset):  # one split saved alone (Dataset.save_to_disk)
        found = {"train": found}
    where = f"hf://{name}" + (f" ({cfg.data.hf_config})" if cfg.data.hf_config else "") if name else cfg.data.data_dir
    return dict(found), where


def _from_folder(path: Path) -> Any:
    datasets = _datasets()
    if not path.is_dir():
        raise UserError(f"--data-dir {path} is not a folder: --dataset hf expects a folder written by "
                        "save_to_disk, a folder of Parquet files, or hf://NAME (a Hub data set)")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    if next(path.rglob("*.parquet"), None) is not None:
        try:
            return datasets.load_dataset("parquet", data_dir=str(path))
        except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as err:
            raise UserError(f"{path}: the Parquet files cannot be read as a data set ({err})") from None
    raise UserError(f"{path} is neither a folder written by save_to_disk (no dataset_dict.json or state.json) nor a "
                    "folder of Parquet files (no *.parquet under it)")


def _from_hub(name: str, config: str | None, revision: str | None) -> Any:
    datasets = _datasets()
    try:
        return datasets.load_dataset(name, name=config, revision=revision)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        offline = isinstance(err, ConnectionError) or datasets.config.HF_HUB_OFFLINE
        snapshot = _hub_snapshot(name, revision)
        if snapshot is not None:  # `hf download` put the files in the hub cache; datasets offline reads only its own
            log.info("hf://%s: reading the snapshot %s from the hub cache", name, snapshot)
            folder = snapshot / config if config and (snapshot / config).is_dir() else snapshot
            return _from_folder(folder)
        if not offline:
            raise UserError(f"hf://{name}: no such data set on the Hugging Face Hub, or it cannot be accessed "
                            f"({reason})") from None
        raise UserError(offline_message(name, config, reason)) from None
    except ValueError as err:  # e.g. an unknown config name: datasets lists the ones there are
        raise UserError(f"hf://{name}: {str(err).splitlines()[0][:300]}") from None


def _hub_snapshot(name: str, revision: str | None) -> Path | None:
    """The folder of the data set's files in the hub cache (as `hf download` leaves them), or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, repo_type="dataset", revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError), or a malformed cache: not usable
        return None


def offline_message(name: str, config: str | None, reason: str) -> str:
    """What to copy where when a Hub data set is wanted offline and is not in this machine's HF cache."""
    datasets = _datasets()
    from huggingface_hub import constants

    folder = name.replace("/", "___")
    args = repr(name) + (f", {config!r}" if config else "")
    return (f"the Hugging Face data set {name!r} is not in this machine's HF cache and the Hub cannot be reached "
            f"({reason}).\nOn a machine with internet, fetch it once (python -c \"import datasets; "
            f"datasets.load_dataset({args})\", or: hf download --repo-type dataset {name}), then copy its "
            f"{folder}/ folder of the datasets cache into {datasets.config.HF_DATASETS_CACHE} here (or its "
            f"datasets--{name.replace('/', '--')}/ folder of the hub cache into {constants.HF_HUB_CACHE}), and run "
            "again (HF_HUB_OFFLINE=1 keeps it off the network); or write it with save_to_disk and pass that folder "
            "as --data-dir.")


# ---- columns and labels --------------------------------------------------------------------------

def image_column(features: dict[str, Any], given: str | None, where: str) -> str:
    datasets = _datasets()
    listing = ", ".join(f"{k} ({type(v).__name__})" for k, v in features.items())
    if given is not None:
        if given not in features:
            raise UserError(f"{where}: --image-column {given!r} is not a column (columns: {listing})")
        if not isinstance(features[given], datasets.Image):
            raise UserError(f"{where}: --image-column {given!r} is not an image column (its feature is "
                            f"{features[given]!r}; image columns have the Image feature)")
        return given
    found = [k for k, v in features.items() if isinstance(v, datasets.Image)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"{where} has no image column (no column has the Image feature; columns: {listing})")
    raise UserError(f"{where} has several image columns ({', '.join(found)}): pick one with --image-column")


def label_column(features: dict[str, Any], given: str | None, where: str) -> str:
    datasets = _datasets()
    listing = ", ".join(f"{k} ({type(v).__name__})" for k, v in features.items())
    if given is not None:
        if given not in features:
            raise UserError(f"{where}: --label-column {given!r} is not a column (columns: {listing})")
        return given
    found = [k for k, v in features.items() if isinstance(v, datasets.ClassLabel)]
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"{where} has several ClassLabel columns ({', '.join(found)}): pick one with --label-column")
    named = next((k for k in LABEL_NAMES if k in features), None)
    if named is None:
        raise UserError(f"{where} has no label column: no column is a ClassLabel, and none is named "
                        f"{' or '.join(LABEL_NAMES)} (columns: {listing}); name it with --label-column")
    if _is_string(features[named]):
        raise UserError(f"{where}: the label column {named!r} holds strings, not class indices: pass --label-column "
                        f"{named} to map its distinct values (sorted) to classes")
    return named


def _is_string(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _is_integer(feature: Any) -> bool:
    return str(getattr(feature, "dtype", "")).startswith(("int", "uint"))


def classes_and_labels(splits: dict[str, Any], column: str, where: str) -> tuple[list[str], dict[str, list[int]]]:
    """The class names and each split's labels (class indices) of the label `column`."""
    datasets = _datasets()
    feature = next(iter(splits.values())).features[column]
    values = {name: list(ds[column]) for name, ds in splits.items()}
    if isinstance(feature, datasets.ClassLabel):
        classes = [str(n) for n in feature.names]
    elif _is_string(feature):  # named with --label-column: the sorted distinct values of the training split
        first = next(iter(values))
        classes = sorted({str(v) for v in values[first] if v is not None})
        index = {c: i for i, c in enumerate(classes)}
        for name, vals in values.items():
            unknown = sorted({str(v) for v in vals if str(v) not in index})
            if unknown:
                raise UserError(f"{where}: the {name} split has label(s) the {first} split lacks: "
                                f"{', '.join(unknown[:_LISTED])}")
        return classes, {name: [index[str(v)] for v in vals] for name, vals in values.items()}
    elif _is_integer(feature):
        top = max((max((v for v in vals if v is not None), default=-1) for vals in values.values()), default=-1)
        classes = [str(i) for i in range(top + 1)]
    else:
        raise UserError(f"{where}: the label column {column!r} has the feature {feature!r}: expected a ClassLabel, "
                        "integers or strings")
    for name, vals in values.items():
        bad = [i for i, v in enumerate(vals) if v is None or not 0 <= int(v) < len(classes)]
        if bad:
            raise UserError(f"{where}: {len(bad)} row(s) of the {name} split have no valid label in column "
                            f"{column!r} (e.g. row {bad[0]}: {vals[bad[0]]!r}; -1 marks an unlabelled row, as in "
                            "some test splits): pick another split with --hf-eval-split / --hf-train-split")
    return classes, {name: [int(v) for v in vals] for name, vals in values.items()}


# ---- the load-time check -------------------------------------------------------------------------

def bad_rows(dataset: Any, column: str) -> dict[int, str]:
    """{row: reason} of the images of `dataset` that cannot be read (checked in threads; the bytes are read in
    batches of rows, the cheap way through Arrow)."""
    starts = range(0, len(dataset), _SCAN_BATCH)

    def check(lo: int) -> list[tuple[int, str]]:
        batch = dataset[lo:lo + _SCAN_BATCH][column]
        found = []
        for k, value in enumerate(batch):
            try:
                reason = check_bytes(row_bytes(value))
            except OSError as err:  # an image kept as a path whose file is gone
                reason = f"{type(err).__name__}: {err}"
            if reason is not None:
                found.append((lo + k, reason))
        return found

    bad: dict[int, str] = {}
    workers = max(1, min(_SCAN_THREADS, os.cpu_count() or 1, len(starts)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for found in pool.map(check, starts):
            bad.update(found)
    return bad


def _readable(split: HFSplit, skip: bool, is_main: bool) -> HFSplit:
    bad = bad_rows(split.dataset, split.column)
    if not bad:
        return split
    listing = "\n  ".join(f"row {r} ({reason})" for r, reason in sorted(bad.items())[:_LISTED])
    more = f"\n  ... and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
    if not skip:
        raise UserError(f"{len(bad)} image(s) of {split.name} cannot be decoded:\n  {listing}{more}\n"
                        "fix the data set, or pass --skip-bad-images to skip them (they are counted)")
    (log.warning if is_main else log.debug)("--skip-bad-images: skipping %d unreadable image(s) of %s:\n  %s%s",
                                            len(bad), split.name, listing, more)
    return split.select([i for i, r in enumerate(split.rows) if r not in bad])


# ---- the entry point -----------------------------------------------------------------------------

def load_hf_splits(cfg: Config, is_main: bool = True) -> Splits:
    """Train and held-out splits of the HF data set the config names (see the module docstring), with the subsets
    applied. `is_main`: whether this process logs the warnings (the others log them at debug level)."""
    d = cfg.data
    if d.data_pipeline == "device" and d.cache_images is None:
        raise UserError("--data-pipeline device holds a whole split in memory as one tensor, which an HF data set's "
                        "encoded images are only once decoded: add --cache-images, or use --data-pipeline workers/"
                        "decode (or auto)")
    datasets = _datasets()
    splits, where = open_dataset(cfg)
    available = ", ".join(splits) or "none"
    if d.hf_train_split not in splits:
        raise UserError(f"{where} has no split {d.hf_train_split!r} (its splits: {available}): name the training "
                        "split with --hf-train-split")
    if d.hf_eval_split is not None and d.hf_eval_split not in splits:
        raise UserError(f"{where} has no split {d.hf_eval_split!r} (its splits: {available}): name the evaluation "
                        "split with --hf-eval-split, or leave it out to hold out --val-split of the training split")
    eval_name = d.hf_eval_split or next((s for s in EVAL_SPLITS if s in splits and s != d.hf_train_split), None)
    used = {n: splits[n] for n in (d.hf_train_split, eval_name) if n is not None}
    features = splits[d.hf_train_split].features
    image = image_column(features, d.image_column, where)
    label = label_column(features, d.label_column, where)
    for name, ds in used.items():
        missing = [c for c in (image, label) if c not in ds.features]
        if missing:
            raise UserError(f"{where}: the {name} split lacks the column(s) {', '.join(missing)}")
    classes, labels = classes_and_labels({n: ds.select_columns([label]) for n, ds in used.items()}, label, where)
    out: dict[str, HFSplit] = {}
    for name, ds in used.items():
        images = ds.select_columns([image]).cast_column(image, datasets.Image(decode=False))
        split = HFSplit(images, image, list(range(len(ds))), labels[name], classes, f"{where} [{name}]",
                        files_stamp(ds), decoder=d.image_decoder)
        out[name] = _readable(split, d.skip_bad_images, is_main)
    train = out[d.hf_train_split]
    if eval_name is not None:
        test = out[eval_name]
        if d.val_split and is_main:
            log.warning("--val-split %s ignored: %s has its own evaluation split %r", d.val_split, where, eval_name)
    elif d.val_split:
        tidx, vidx = stratified_split(train.labels.tolist(), classes, d.val_split, cfg.run.seed)
        train, test = train.select(tidx), train.select(vidx)
    else:
        raise UserError(f"{where} has no evaluation split (none of {', '.join(EVAL_SPLITS)}; its splits: "
                        f"{available}): name one with --hf-eval-split, or pass --val-split 0.1 to hold out a seeded, "
                        "stratified 10% of each class of the training split")
    if not len(train) or not len(test):
        raise UserError(f"{where}: the {'training' if not len(train) else 'evaluation'} split has no readable images")
    log.info("HF data set %s: %d train / %d eval images (%s), %d classes, images in %r, labels in %r", where,
             len(train), len(test), eval_name or f"--val-split {d.val_split}", len(classes), image, label)
    return apply_subsets(train, test, d.train_subset, d.eval_subset, d.subset_order, cfg.run.seed)
