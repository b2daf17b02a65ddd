"""Image folders (`--dataset folder`): discovery, the load-time check of every file, the seeded stratified
split, subsets, and a short training run on a folder (its split.json reused by `dtl eval`).

The folders are written by the tests from `dtl.data.cifar.make_synthetic` images, as PNG and JPEG files of
different sizes (square and not), plus one corrupt file (random bytes named .jpg) and one truncated PNG.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtl import cli
from dtl.config import Config
from dtl.data import folder
from dtl.data.cifar import make_synthetic
from dtl.errors import UserError
from tests.conftest import train_inproc

CLASSES = 3
PER_CLASS = 16
#: (width, height) of image i % 3: square, wide and tall, so resizing must produce one fixed size
SIZES = ((32, 32), (48, 32), (32, 40))


def write_folder(root: Path, per_class: int = PER_CLASS, seed: int = 0, bad: bool = True) -> dict[str, Path]:
    """root/<class>/NNN.{png,jpg} from the synthetic set; returns {"corrupt": ..., "truncated": ...}."""
    split = make_synthetic(per_class * CLASSES, num_classes=CLASSES, seed=seed)
    for i in range(len(split)):
        cls_dir = root / split.classes[int(split.labels[i])]
        cls_dir.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(split.images[i].permute(1, 2, 0).numpy()).resize(SIZES[i % 3])
        if i % 2:
            img.save(cls_dir / f"{i:03d}.jpg", quality=95)
        else:
            img.save(cls_dir / f"{i:03d}.png")
    if not bad:
        return {}
    corrupt = root / split.classes[1] / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    png = next((root / split.classes[2]).glob("*.png")).read_bytes()
    truncated = root / split.classes[2] / "truncated.png"
    truncated.write_bytes(png[: len(png) // 2])
    return {"corrupt": corrupt, "truncated": truncated}


@contextlib.contextmanager
def dtl_log():
    """Records of the `dtl` logger, whatever handlers an earlier run installed on it."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("dtl")
    handler, level = _Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def cfg_for(data_dir: Path, **kw) -> Config:
    return Config(dataset="folder", data_dir=str(data_dir), mode="scratch", **kw)


def all_files(split: folder.FolderSplit) -> set[str]:
    return {str(p) for p in split.paths()}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("folder") / "images"
    return root, write_folder(root)


# ---- the load-time check ---------------------------------------------------------------------------

def test_unreadable_files_are_reported_by_path_and_skipped(image_dir):
    root, bad = image_dir
    with dtl_log() as records:
        splits = folder.load_folder_splits(cfg_for(root, val_split=0.25))
    warnings = "\n".join(r.getMessage() for r in records if r.levelno == logging.WARNING)
    assert str(bad["corrupt"]) in warnings and str(bad["truncated"]) in warnings
    assert "skipping 2 unreadable" in warnings
    used = all_files(splits.train) | all_files(splits.test)
    assert len(used) == CLASSES * PER_CLASS and not {str(p) for p in bad.values()} & used
    assert sorted(splits.train.source["skipped"]) == sorted(p.relative_to(root).as_posix() for p in bad.values())


def test_strict_images_refuses_and_names_every_bad_file(image_dir):
    root, bad = image_dir
    with pytest.raises(UserError) as err:
        folder.load_folder_splits(cfg_for(root, val_split=0.25, strict_images=True))
    assert str(bad["corrupt"]) in str(err.value) and str(bad["truncated"]) in str(err.value)


def test_warnings_come_from_the_main_process_only(image_dir):
    root, bad = image_dir
    with dtl_log() as records:
        logging.getLogger("dtl").setLevel(logging.DEBUG)  # dtl_log restores the level
        splits = folder.load_folder_splits(cfg_for(root, val_split=0.25), is_main=False)
    assert not [r for r in records if r.levelno >= logging.WARNING]  # another rank: debug level only
    assert any(str(bad["corrupt"]) in r.getMessage() for r in records if r.levelno == logging.DEBUG)
    assert len(splits.train) + len(splits.test) == CLASSES * PER_CLASS  # the same files are skipped


# ---- the split ---------------------------------------------------------------------------------------

def test_val_split_is_seeded_and_stratified(image_dir):
    root, _ = image_dir
    a = folder.load_folder_splits(cfg_for(root, val_split=0.25, seed=0))
    b = folder.load_folder_splits(cfg_for(root, val_split=0.25, seed=0))
    c = folder.load_folder_splits(cfg_for(root, val_split=0.25, seed=1))
    assert a.test.files == b.test.files and a.train.files == b.train.files  # same seed, same split
    assert a.test.files != c.test.files  # another seed, another split
    assert a.classes == ["class_0", "class_1", "class_2"]  # sorted folder names
    # stratified: round(0.25 x 16) = 4 held out of every class (the corrupt files were dropped first)
    assert a.test.counts() == [4, 4, 4] and a.train.counts() == [12, 12, 12]
    assert not set(a.train.files) & set(a.test.files)
    for s in (a.train, a.test):  # labels follow the class folders
        assert [s.classes[lab] for lab in s.labels.tolist()] == [f.split("/")[0] for f in s.files]


def test_train_and_val_folders(tmp_path):
    write_folder(tmp_path / "d" / "train", per_class=4, bad=False)
    write_folder(tmp_path / "d" / "val", per_class=2, seed=1, bad=False)
    with dtl_log() as records:
        splits = folder.load_folder_splits(cfg_for(tmp_path / "d", val_split=0.5))
    assert any("ignored" in r.getMessage() for r in records)  # the val/ folder wins over --val-split
    assert len(splits.train) == 12 and len(splits.test) == 6
    assert splits.test.root == tmp_path / "d" / "val" and splits.test.counts() == [2, 2, 2]
    # no held-out folder and no --val-split: a clear error, not an empty test set
    with pytest.raises(UserError, match="--val-split"):
        folder.load_folder_splits(cfg_for(tmp_path / "d" / "train"))
    with pytest.raises(UserError, match="device"):
        folder.load_folder_splits(cfg_for(tmp_path / "d", data_pipeline="device"))


def test_subset_matches_split_subset_semantics(image_dir):
    root, _ = image_dir
    splits = folder.load_folder_splits(cfg_for(root, val_split=0.25, train_subset=10, eval_subset=5,
                                               subset_order="random"))
    assert len(splits.train) == 10 and len(splits.test) == 5
    full = folder.load_folder_splits(cfg_for(root, val_split=0.25))
    assert splits.train.files == full.train.subset(10, "random", 0).files
    assert full.train.subset(3).files == full.train.files[:3]


def test_folder_subsets_are_stratified_by_default_and_say_so(image_dir):
    root, _ = image_dir
    cfg = cfg_for(root, val_split=0.25, train_subset=6, eval_subset=3)
    assert cfg.data.subset_order == "stratified" and Config(train_subset=6).data.subset_order == "first"
    with dtl_log() as records:
        splits = folder.load_folder_splits(cfg)
    # the files are sorted by class: the first 6 would all be class 0
    assert splits.train.counts() == [2, 2, 2] and splits.test.counts() == [1, 1, 1]
    assert any("--train-subset: a stratified 6" in r.getMessage() for r in records)
    assert any("--eval-subset: a stratified 3" in r.getMessage() for r in records)
    full = folder.load_folder_splits(cfg_for(root, val_split=0.25))
    assert splits.train.files == full.train.subset(6, "stratified", 0).files
    # --image-decoder reaches the files' decoding through subsets and relabelling
    tv = folder.load_folder_splits(cfg_for(root, val_split=0.25, train_subset=6, image_decoder="torchvision"))
    assert tv.train.images.decoder == "torchvision" == tv.test.with_classes(tv.test.classes).images.decoder


# ---- training on a folder ----------------------------------------------------------------------------

def test_transfer_training_on_an_image_folder(image_dir, tmp_path, capsys):
    """A short transfer run (a weights file we write) on the folder, with a DataLoader worker decoding the
    files; the unreadable files are named on stderr, the split is saved, and `dtl eval` of the run uses it."""
    import torchvision
    from safetensors.torch import save_file

    root, bad = image_dir
    torch.manual_seed(0)
    weights = tmp_path / "squeezenet_random.safetensors"
    save_file(torchvision.models.squeezenet1_1().state_dict(), str(weights))
    out = tmp_path / "run"
    code = train_inproc("--dataset", "folder", "--data-dir", str(root), "--val-split", "0.25",
                        "--model", "squeezenet1_1", "--mode", "transfer", "--weights", str(weights),
                        "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--num-workers", "1",
                        "--lr", "0.01", "--device", "cpu", "--output-dir", str(out))
    err = capsys.readouterr().err
    assert code == 0, err
    assert str(bad["corrupt"]) in err and str(bad["truncated"]) in err
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_count"] == 36 and row["test_count"] == 12
    saved = json.loads((out / "split.json").read_text())
    expected = folder.load_folder_splits(cfg_for(root, val_split=0.25))
    assert saved["val"]["files"] == expected.test.files and len(saved["skipped"]) == 2

    code = cli.main(["eval", "--checkpoint", str(out), "--device", "cpu", "--output-dir", str(tmp_path / "ev")])
    assert code == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["count"] == 12 and summary["top1"] == row["test_acc"]
    assert summary["top5"] is None  # 3 classes: no top-5

    # another labelled folder: its val/ folder is evaluated; class folders the model lacks are refused
    write_folder(tmp_path / "other" / "val", per_class=2, seed=3, bad=False)
    code = cli.main(["eval", "--checkpoint", str(out), "--device", "cpu", "--data-dir", str(tmp_path / "other"),
                        "--output-dir", str(tmp_path / "ev2")])
    assert code == 0
    assert json.loads((tmp_path / "ev2" / "summary.json").read_text())["count"] == 6
    (tmp_path / "other" / "val" / "zebra").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "other" / "val" / "zebra" / "z.png")
    code = cli.main(["eval", "--checkpoint", str(out), "--device", "cpu", "--data-dir", str(tmp_path / "other"),
                        "--output-dir", str(tmp_path / "ev3")])
    assert code == 2 and "zebra" in capsys.readouterr().err


def test_a_single_class_is_refused(tmp_path, capfd):
    """One class folder would train to a meaningless 100%: exit 2, one message, nothing written."""
    root = tmp_path / "one"
    write_folder(root, per_class=6, bad=False)
    for extra in sorted(p for p in root.iterdir())[1:]:
        shutil.rmtree(extra)
    code = train_inproc("--dataset", "folder", "--data-dir", str(root), "--val-split", "0.3", "--image-size", "32",
                        "--device", "cpu", "--model", "squeezenet1_1", "--mode", "scratch", "--epochs", "1",
                        "--output-dir", str(tmp_path / "run"))
    assert code == 2 and "needs at least two" in capfd.readouterr().err
    assert not (tmp_path / "run").exists()
