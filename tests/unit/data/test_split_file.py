"""dtl.data.split_file: a run's OUTDIR/split.json lists each split's files relative to the data folder, and
reading it back gives exactly the saved split, whatever seed the resumed run is given."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dtl.data import datasets, folder, split_file
from tests.unit.data.test_folder import cfg_for, write_folder


def test_the_split_is_saved_and_read_back(tmp_path):
    write_folder(tmp_path / "images", per_class=8, bad=False)
    root = tmp_path / "images"
    a = folder.load_folder_splits(cfg_for(root, val_split=0.25, seed=0))
    path = split_file.save_split(tmp_path / "run", a)
    saved = json.loads(path.read_text())
    assert path == tmp_path / "run" / "split.json"
    assert saved["val"]["files"] == a.test.files and saved["train"]["files"] == a.train.files
    assert all(not Path(f).is_absolute() for f in saved["train"]["files"] + saved["val"]["files"])
    # a resumed run reads the saved split back (its caller passes the file), even if the seed it is given differs
    resumed = folder.load_folder_splits(cfg_for(root, val_split=0.25, seed=7), split_file=path)
    assert resumed.test.files == a.test.files and resumed.train.files == a.train.files
    assert torch.equal(resumed.test.labels, a.test.labels)


def test_the_split_file_is_the_callers_choice(tmp_path):
    """No split file, or one that does not exist: split anew; `datasets.load_splits` passes the file through."""
    write_folder(tmp_path / "images", per_class=8, bad=False)
    root = tmp_path / "images"
    a = folder.load_folder_splits(cfg_for(root, val_split=0.25, seed=0))
    path = split_file.save_split(tmp_path / "run", a)
    assert folder.load_folder_splits(cfg_for(root, val_split=0.25, seed=1),
                                     split_file=tmp_path / "none.json").test.files != a.test.files
    resumed = datasets.load_splits(cfg_for(root, val_split=0.25, seed=1), allow_download=False, split_file=path)
    assert resumed.test.files == a.test.files and resumed.train.files == a.train.files
    only_test = folder.load_folder_splits(cfg_for(root, val_split=0.25, seed=1), split_file=path,
                                          with_train=False)
    assert only_test.test.files == a.test.files and len(only_test.train) == 0
