"""Run folders recorded by real (tiny, in-process) dtl runs, for the harness's tests: the files the steps judge
are dtl's own, so a change in what dtl writes shows here. Tests copy a recorded folder and edit the copy."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TINY, train_inproc


@dataclass(frozen=True)
class Recorded:
    plain: Path
    """squeezenet1_1, 1 epoch, completed."""
    cached_first: Path
    """timm/test_vit --cache-features, the first start (1 epoch): the features computed."""
    cached_second: Path
    """The same run after `--resume auto --epochs 2`: the features reused, resumed from the first's checkpoint."""


@pytest.fixture(scope="session")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("recorded")
    small = ["--train-subset", "32", "--eval-subset", "16", "--no-augment"]
    assert train_inproc(*TINY, *small, "--epochs", "1", "--output-dir", str(root / "plain")) == 0
    torch.manual_seed(0)
    weights = root / "vit.safetensors"
    save_file(timm.create_model("test_vit", img_size=32).state_dict(), str(weights))
    cached = [*TINY, *small, "--model", "timm/test_vit", "--mode", "transfer", "--weights", str(weights),
              "--cache-features", "--dropout", "0", "--output-dir", str(root / "cached")]
    assert train_inproc(*cached, "--epochs", "1") == 0
    shutil.copytree(root / "cached", root / "cached_first")
    assert train_inproc(*cached, "--epochs", "2", "--resume", "auto") == 0
    return Recorded(root / "plain", root / "cached_first", root / "cached")


def copy_run(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes: Any) -> None:
    """Set top-level keys of a JSON file (a dict value is merged into the existing one)."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(data))


def edit_metrics(run: Path, **changes: Any) -> None:
    """Set keys in every metrics.jsonl row."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**row, **changes}) + "\n" for row in rows))
