"""Hugging Face data sets (`--dataset hf`): a `DatasetDict` written by the tests from PIL images, read from
save_to_disk folders and Parquet files, the columns and classes found from the features, the splits, every bad
input refused with one message (exit 2, nothing written), --skip-bad-images, a short training run (decode pipeline
and --cache-images) and `dtl eval` of it, and a Hub data set read offline from a temporary HF cache."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtl import cli
from dtl.config import Config
from dtl.data.cifar import make_synthetic
from dtl.data.hf import load_hf_splits
from dtl.errors import UserError
from tests.conftest import ROOT, train_inproc

datasets = pytest.importorskip("datasets")

CLASSES = ["cat", "dog", "fox"]


def pil_images(n: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """n learnable images (`make_synthetic`) of three sizes, as PIL images, and their labels."""
    split = make_synthetic(n, num_classes=len(CLASSES), seed=seed)
    sizes = ((32, 32), (40, 32), (32, 36))
    images = [Image.fromarray(split.images[i].permute(1, 2, 0).numpy()).resize(sizes[i % 3]) for i in range(n)]
    return images, split.labels.tolist()


def image_dataset(n: int, seed: int, **extra_columns) -> datasets.Dataset:
    images, labels = pil_images(n, seed)
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}
    columns = {"image": images, "label": labels}
    for name, (values, feature) in extra_columns.items():
        columns[name], features[name] = values, feature
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def write_hf(out: Path, train: int = 48, test: int = 15, **extra_columns) -> Path:
    """out/: a DatasetDict (train, test) written by save_to_disk."""
    datasets.DatasetDict({"train": image_dataset(train, 0, **extra_columns),
                          "test": image_dataset(test, 7, **extra_columns)}).save_to_disk(str(out))
    return out


@pytest.fixture(autouse=True)
def _own_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parquet folders are prepared into the `datasets` cache: a temporary one, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


def cfg_for(data_dir: Path | str, **kw) -> Config:
    return Config(dataset="hf", data_dir=str(data_dir), mode="scratch", **kw)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf(tmp_path_factory.mktemp("hf") / "disk")


def test_save_to_disk_and_parquet_give_the_same_splits(hf_dir, tmp_path):
    """Columns from the features (Image, ClassLabel), classes from the ClassLabel, test evaluates."""
    disk = load_hf_splits(cfg_for(hf_dir))
    assert (len(disk.train), len(disk.test)) == (48, 15) and disk.classes == CLASSES
    pq = tmp_path / "pq"
    pq.mkdir()
    for name in ("train", "test"):
        datasets.load_from_disk(str(hf_dir))[name].to_parquet(str(pq / f"{name}-00000-of-00001.parquet"))
    parquet = load_hf_splits(cfg_for(pq))
    assert parquet.classes == CLASSES
    assert parquet.train.labels.tolist() == disk.train.labels.tolist()
    assert parquet.test.labels.tolist() == disk.test.labels.tolist()
    for i in (0, 1, 47):  # the same bytes, decoded by dtl's decoders
        assert parquet.train.encoded(i).tolist() == disk.train.encoded(i).tolist()
        img = disk.train.images[i]
        assert img.shape[0] == 3 and img.dtype == torch.uint8


def test_val_split_holds_out_a_stratified_part_when_there_is_no_eval_split(tmp_path):
    datasets.DatasetDict({"train": image_dataset(60, 0)}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(UserError, match="no evaluation split.*--val-split"):
        load_hf_splits(cfg_for(tmp_path / "d"))
    splits = load_hf_splits(cfg_for(tmp_path / "d", val_split=0.25, seed=3))
    assert (len(splits.train), len(splits.test)) == (45, 15)
    assert splits.test.counts() == [5, 5, 5]
    again = load_hf_splits(cfg_for(tmp_path / "d", val_split=0.25, seed=3))
    assert again.test.rows == splits.test.rows  # seeded: `dtl eval` finds the same images
    # a Dataset saved alone is the training split
    image_dataset(30, 1).save_to_disk(str(tmp_path / "one"))
    assert len(load_hf_splits(cfg_for(tmp_path / "one", val_split=0.2)).test) == 6


def test_stratified_subset(hf_dir):
    splits = load_hf_splits(cfg_for(hf_dir, train_subset=12))
    assert len(splits.train) == 12 and sorted(splits.train.counts()) == [4, 4, 4]


def test_a_label_column_of_strings_needs_label_column(tmp_path):
    images, labels = pil_images(30, 0)
    names = [CLASSES[v] for v in labels]
    ds = datasets.Dataset.from_dict({"image": images, "label": names},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(9))}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(UserError, match="holds strings.*--label-column label"):
        load_hf_splits(cfg_for(tmp_path / "d"))
    splits = load_hf_splits(cfg_for(tmp_path / "d", label_column="label"))
    assert splits.classes == sorted(CLASSES) and splits.train.labels.tolist() == labels


@pytest.mark.parametrize(("columns", "flags", "message"), [
    ("no_label", {}, "has no label column"),
    ("caption", {"image_column": "caption"}, "'caption' is not an image column"),
    ("caption", {"image_column": "picture"}, "'picture' is not a column"),
    ("caption", {"hf_eval_split": "validation"}, "has no split 'validation'"),
    ("caption", {"hf_train_split": "all"}, "has no split 'all'"),
])
def test_bad_columns_and_splits_are_refused_with_one_message(tmp_path, columns, flags, message):
    images, labels = pil_images(12, 0)
    data = {"image": images, "caption": [f"a photo {i}" for i in range(12)]}
    features = {"image": datasets.Image(), "caption": datasets.Value("string")}
    if columns == "caption":
        data["label"], features["label"] = labels, datasets.ClassLabel(names=CLASSES)
    ds = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(UserError, match=message):
        load_hf_splits(cfg_for(tmp_path / "d", **flags))


def corrupt_dataset(out: Path) -> Path:
    """train: 30 good images and two bad ones (random bytes; a truncated PNG) at rows 5 and 17."""
    images, labels = pil_images(32, 0)
    rows: list = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        rows.append({"bytes": buf.getvalue(), "path": None})
    rows[5] = {"bytes": np.random.default_rng(0).bytes(900), "path": None}
    rows[17] = {"bytes": rows[17]["bytes"][:60], "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    train = datasets.Dataset.from_dict({"image": rows, "label": labels}, features=features)
    datasets.DatasetDict({"train": train, "test": image_dataset(9, 7)}).save_to_disk(str(out))
    return out


def test_a_corrupt_image_stops_the_run_or_is_skipped_and_counted(tmp_path, capfd):
    data = corrupt_dataset(tmp_path / "bad")
    with pytest.raises(UserError, match=r"(?s)2 image\(s\).*row 5 .*row 17 .*--skip-bad-images"):
        load_hf_splits(cfg_for(data))
    splits = load_hf_splits(cfg_for(data, skip_bad_images=True))
    assert len(splits.train) == 30 and 5 not in splits.train.rows and 17 not in splits.train.rows
    flags = ("--dataset", "hf", "--data-dir", str(data), "--image-size", "32", "--device", "cpu", "--model",
             "squeezenet1_1", "--mode", "scratch", "--epochs", "1", "--num-workers", "0")
    code = train_inproc(*flags, "--output-dir", str(tmp_path / "run"))
    assert code == 2 and "cannot be decoded" in capfd.readouterr().err
    assert not (tmp_path / "run").exists()


def test_training_decode_and_cached_then_eval(hf_dir, tmp_path, capsys):
    """A short run through the decode pipeline, one from --cache-images (the same class counts), and `dtl eval`
    of the first, which reads the same evaluation split."""
    flags = ("--dataset", "hf", "--data-dir", str(hf_dir), "--image-size", "32", "--device", "cpu", "--model",
             "squeezenet1_1", "--mode", "scratch", "--epochs", "1", "--batch-size", "16", "--num-workers", "1")
    assert train_inproc(*flags, "--output-dir", str(tmp_path / "run")) == 0, capsys.readouterr().err
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_count"] == 48 and row["test_count"] == 15
    assert train_inproc(*flags, "--cache-images", str(tmp_path / "cache"), "--class-balance", "sampler",
                        "--output-dir", str(tmp_path / "cached")) == 0, capsys.readouterr().err
    assert list((tmp_path / "cache").glob("*.u8"))
    code = cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--device", "cpu", "--output-dir",
                     str(tmp_path / "ev")])
    assert code == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["count"] == 15 and summary["top1"] == row["test_acc"]


OFFLINE = r"""
import sys
from dtl.config import Config
from dtl.data.hf import load_hf_splits
from dtl.errors import UserError
splits = load_hf_splits(Config(dataset="hf", data_dir="hf://someone/pets", mode="scratch"))
print("counts", len(splits.train), len(splits.test), splits.classes)
try:
    load_hf_splits(Config(dataset="hf", hf_name="someone/absent", mode="scratch"))
except UserError as err:
    print("absent:", err)
"""


def test_a_hub_data_set_is_read_offline_from_the_hf_cache(hf_dir, tmp_path):
    """A snapshot of a Hub data set's Parquet files placed in a temporary hub cache (the layout `hf download`
    leaves) is read with HF_HUB_OFFLINE=1; a data set not there gets a message saying what to copy where."""
    hub = tmp_path / "hf" / "hub"
    repo = hub / "datasets--someone--pets"
    commit = "0" * 40
    snap = repo / "snapshots" / commit / "data"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("train", "test"):
        datasets.load_from_disk(str(hf_dir))[name].to_parquet(str(snap / f"{name}-00000-of-00001.parquet"))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", OFFLINE], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"counts 48 15 {CLASSES!r}" in res.stdout
    absent = res.stdout.split("absent:", 1)[1]
    assert "not in this machine's HF cache" in absent and str(hub) in absent and "datasets--someone--absent" in absent
