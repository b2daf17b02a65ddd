"""WebDataset tar shards (`--dataset webdataset`, the optional extra ``pip install 'dtl[webdataset]'``): which shards
a run reads, how many samples each holds, and the checks made before anything is written; read by the `webdataset`
library (`dtl.data.loaders.webdataset` streams them).

``--data-dir`` (the training shards) and ``--eval-data`` (the evaluation shards) take a brace pattern
(``DIR/train-{000000..000127}.tar``), a ``::``-separated list, any URL `webdataset` opens (``pipe:...``, ``http://``),
or a folder written by `dtl data shards`, whose ``manifest.json`` names both splits' shards. A sample is the tar
members sharing a key: its image under ``--image-column`` (default: the first of `IMAGE_KEYS` present) and its
label, a class index as text, under ``--label-column`` (default ``cls``).

How many samples each shard holds has to be known before an epoch starts, so that every rank is given the same
number of batches (`dtl.data.loaders.webdataset`): from the ``manifest.json`` beside the shards (`dtl data shards`
writes it, with every sample's label, the classes and the counts per class), whose local shards are checked against
it (present, the recorded size, a complete tar); without one, every shard is read once here (each process counts
them: write a manifest for large data sets) and each sample checked (image readable, label present). An empty,
truncated or unreadable shard, a sample without a label or a corrupt image stops the run with one message before
anything is written; with ``--skip-bad-images`` a corrupt image is skipped and counted instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from dtl.config import Config
from dtl.data.images import check_bytes
from dtl.data.splits import Splits
from dtl.errors import UserError

__all__ = ["IMAGE_KEYS", "LABEL_KEY", "MANIFEST", "MANIFEST_FORMAT", "MANIFEST_VERSION", "Shard", "ShardSplit",
           "image_of", "label_of", "load_shard_splits", "local_path", "samples", "shard_urls"]

log = logging.getLogger("dtl")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dtl-shards"
MANIFEST_VERSION = 1
#: the keys (extensions) taken as a sample's image when --image-column is not given, in order of preference
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm")
LABEL_KEY = "cls"
_LISTED = 10


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise UserError("--dataset webdataset needs the `webdataset` library: pip install 'dtl[webdataset]'") from None
    return webdataset


@dataclass(frozen=True)
class Shard:
    """One tar shard: where it is, the labels of its readable samples in order, and the keys of the samples
    skipped (unreadable images under --skip-bad-images) that readers pass over. `take`: read only the first
    `take` readable samples (the last shard of a --train-subset)."""

    url: str
    labels: tuple[int, ...]
    skip: frozenset[str] = frozenset()
    take: int | None = None

    @property
    def count(self) -> int:
        return len(self.labels) if self.take is None else self.take


@dataclass
class ShardSplit:
    """A split held in tar shards: the shards, in the data set's order, and the classes. `labels` are every readable
    sample's label in that order (what counting needs: class weights, the per-class log); the images are streamed by
    `dtl.data.loaders.webdataset.ShardLoader`, never indexed (so it has no `images`). `image_key` None: the first of
    `IMAGE_KEYS` a sample has."""

    shards: list[Shard]
    classes: list[str]
    name: str
    image_key: str | None = None
    label_key: str = LABEL_KEY
    skip_bad: bool = False
    decoder: str = "auto"
    labels: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.labels = torch.tensor([lab for s in self.shards for lab in s.labels[:s.count]], dtype=torch.int64)

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def subset(self, n: int | None, order: str = "first", seed: int = 0) -> ShardSplit:
        """The first n samples, in the data set's order (shards are read in order: no random or stratified
        subsets)."""
        if n is None or n >= len(self):
            return self
        if order != "first":
            raise UserError(f"a {order} subset of webdataset shards: they are read in order, so a subset is the first "
                            "N samples (--subset-order first)")
        kept, left = [], n
        for shard in self.shards:
            if left <= 0:
                break
            kept.append(shard if shard.count <= left else replace(shard, take=left))
            left -= min(shard.count, left)
        return replace(self, shards=kept)


# ---- reading samples -------------------------------------------------------------------------------

def samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard (dicts of key -> bytes, ``__key__``), as the `webdataset` library groups a tar's
    members; any tar error is raised."""
    wds = _webdataset()
    yield from wds.tarfile_samples([{"url": url}])


def image_of(sample: dict[str, Any], key: str | None) -> bytes | None:
    if key is not None:
        return sample.get(key)
    return next((sample[k] for k in IMAGE_KEYS if k in sample), None)


def label_of(sample: dict[str, Any], key: str) -> int | None:
    """The sample's label (a class index as text), or None when it has none or it is not an integer."""
    raw = sample.get(key)
    if raw is None:
        return None
    try:
        return int(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        return None


def describe(url: str, key: str) -> str:
    return f"sample {key!r} of {url}"


# ---- which shards ---------------------------------------------------------------------------------

def shard_urls(spec: str) -> list[str]:
    """The shards a pattern or list names (webdataset's brace expansion, '::' lists)."""
    wds = _webdataset()
    urls = [u for u in wds.shardlists.expand_urls(spec) if u]
    if not urls:
        raise UserError(f"{spec!r} names no shards")
    return urls


def local_path(url: str) -> Path | None:
    """The file a shard URL names on this machine (a path or file://), or None for pipe:, http:, ..."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "":
        return Path(url)
    return None


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable shard manifest ({err}); delete it (the shards are then counted "
                        "at start) or write the shards again with `dtl data shards`") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
        raise UserError(f"{path} is not a {MANIFEST_FORMAT} version {MANIFEST_VERSION} manifest")
    return data


def _manifest_beside(urls: list[str]) -> tuple[Path, dict[str, Any]] | None:
    first = local_path(urls[0])
    if first is None:
        return None
    path = first.parent / MANIFEST
    return (path, _read_manifest(path)) if path.is_file() else None


def _tar_complete(path: Path) -> str | None:
    """Why a local shard is not a complete tar archive (None: it looks complete): empty, missing, or lacking the
    zero blocks that end every tar archive (a copy cut short)."""
    if not path.is_file():
        return "no such file"
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    if size % 512:
        return f"truncated ({size} bytes, not a whole number of 512-byte tar blocks)"
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        if f.read().strip(b"\0"):
            return "truncated (it does not end with the end-of-archive blocks of a tar file)"
    return None


def _from_manifest(urls: list[str], manifest: dict[str, Any], path: Path) -> tuple[list[Shard], list[str]]:
    """The shards' labels as the manifest records them, each local shard checked against it."""
    recorded = {}
    for split in (manifest.get("splits") or {}).values():
        for entry in split.get("shards", []):
            recorded[entry["url"]] = entry
    shards, problems = [], []
    for url in urls:
        entry = recorded.get(Path(urlparse(url).path).name) or recorded.get(url)
        if entry is None:
            raise UserError(f"{url} is not listed in {path}: it belongs to another set of shards? (list the shards the "
                            "manifest names, or remove the manifest to count them at start)")
        local = local_path(url)
        problem = _tar_complete(local) if local is not None else None
        if problem is None and local is not None and entry.get("filesize") not in (None, local.stat().st_size):
            problem = f"{local.stat().st_size} bytes, not the {entry['filesize']} recorded in {path.name}: changed"
        if problem is not None:
            problems.append(f"{url}: {problem}")
        shards.append(Shard(url, tuple(int(v) for v in entry["labels"])))
    if problems:
        raise UserError(f"{len(problems)} shard(s) cannot be read:\n  " + "\n  ".join(problems[:_LISTED]) +
                        "\nwrite them again (`dtl data shards`) or copy them again")
    return shards, [str(c) for c in manifest.get("classes", [])]


def _scan(urls: list[str], image_key: str | None, label_key: str, skip_bad: bool) -> tuple[list[Shard], list[str]]:
    """Every shard read once: its samples counted, each one's label and image checked."""
    import tarfile

    shards, problems, bad_images = [], [], []
    for url in urls:
        local = local_path(url)
        problem = _tar_complete(local) if local is not None else None
        if problem is not None:
            problems.append(f"{url}: {problem}")
            continue
        labels, skip = [], set()
        try:
            for sample in samples(url):
                key = sample["__key__"]
                label = label_of(sample, label_key)
                if label is None or label < 0:
                    problems.append(f"{describe(url, key)}: no label (an integer under the key {label_key!r}; it has "
                                    f"{', '.join(k for k in sample if not k.startswith('__'))})")
                    continue
                data = image_of(sample, image_key)
                reason = "no image" if data is None else check_bytes(data)
                if reason is not None:
                    bad_images.append(f"{describe(url, key)}: {reason}")
                    skip.add(key)
                    continue
                labels.append(label)
        except (tarfile.TarError, OSError, ValueError) as err:
            problems.append(f"{url}: unreadable ({type(err).__name__}: {str(err)[:200]})")
            continue
        if not labels and not skip:
            problems.append(f"{url}: empty (no samples)")
        shards.append(Shard(url, tuple(labels), frozenset(skip)))
    if problems:
        raise UserError(f"{len(problems)} problem(s) in the shards:\n  " + "\n  ".join(problems[:_LISTED]) +
                        (f"\n  ... and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""))
    if bad_images and not skip_bad:
        raise UserError(f"{len(bad_images)} image(s) in the shards cannot be decoded:\n  " +
                        "\n  ".join(bad_images[:_LISTED]) + "\nfix the shards, or pass --skip-bad-images to skip them "
                        "(they are counted)")
    if bad_images:
        log.warning("--skip-bad-images: skipping %d unreadable image(s) in the shards:\n  %s", len(bad_images),
                    "\n  ".join(bad_images[:_LISTED]))
    top = max((max(s.labels, default=-1) for s in shards), default=-1)
    return shards, [str(i) for i in range(top + 1)]


def _split_of(spec: str, cfg: Config, role: str) -> ShardSplit:
    d = cfg.data
    urls = shard_urls(spec)
    found = _manifest_beside(urls)
    if found is not None:
        path, manifest = found
        shards, classes = _from_manifest(urls, manifest, path)
        image_key = d.image_column or manifest.get("image_key")
        label_key = d.label_column or manifest.get("label_key") or LABEL_KEY
    else:
        log.info("no %s beside %s: reading the %d %s shard(s) once to count and check them (`dtl data shards` writes "
                 "one)", MANIFEST, urls[0], len(urls), role)
        image_key, label_key = d.image_column, d.label_column or LABEL_KEY
        shards, classes = _scan(urls, image_key, label_key, d.skip_bad_images)
    empty = [s.url for s in shards if not s.labels and not s.skip]
    if empty:
        raise UserError(f"{len(empty)} shard(s) hold no samples: {', '.join(empty[:_LISTED])}")
    return ShardSplit(shards, classes, f"{role} shards {spec}", image_key, label_key, d.skip_bad_images,
                      d.image_decoder)


def _folder_specs(folder: Path) -> tuple[str, str | None]:
    manifest = _read_manifest(folder / MANIFEST)
    splits = manifest.get("splits") or {}
    if "train" not in splits:
        raise UserError(f"{folder / MANIFEST} names no train shards")
    spec = "::".join(str(folder / s["url"]) for s in splits["train"]["shards"])
    held = next((splits[k] for k in ("val", "test") if k in splits), None)
    return spec, "::".join(str(folder / s["url"]) for s in held["shards"]) if held else None


def load_shard_splits(cfg: Config, is_main: bool = True) -> Splits:
    """The training and evaluation `ShardSplit`s (see the module docstring), the subsets applied (the first N)."""
    d = cfg.data
    train_spec, eval_spec = d.data_dir, d.eval_data
    folder = Path(d.data_dir)
    if folder.is_dir():
        if not (folder / MANIFEST).is_file():
            raise UserError(f"--data-dir {folder} is a folder without a {MANIFEST}: give the shards (e.g. "
                            f"'{folder}/train-{{000000..000009}}.tar'), or a folder written by `dtl data shards`")
        train_spec, held = _folder_specs(folder)
        eval_spec = eval_spec or held
    if eval_spec is None:
        raise UserError("--dataset webdataset needs evaluation shards: --eval-data PATTERN (or a manifest.json "
                        "naming val shards)")
    train, test = _split_of(train_spec, cfg, "train"), _split_of(eval_spec, cfg, "eval")
    short, long = sorted((train.classes, test.classes), key=len)
    if long[:len(short)] != short:  # counted shards name classes 0..max label: one may know fewer
        raise UserError(f"the train and eval shards name different classes ({', '.join(train.classes[:5])} ... against "
                        f"{', '.join(test.classes[:5])} ...)")
    train.classes, test.classes = list(long), list(long)
    train, test = train.subset(d.train_subset), test.subset(d.eval_subset)
    if is_main:
        log.info("webdataset shards: %d train samples in %d shard(s), %d eval samples in %d shard(s), %d classes",
                 len(train), len(train.shards), len(test), len(test.shards), len(train.classes))
    return Splits(train, test)
