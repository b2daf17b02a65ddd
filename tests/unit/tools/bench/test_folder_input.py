"""`dtl bench --dataset folder`: the folder input phase runs every side on a folder and reports ratios (structure
only: no timing assertions)."""

from __future__ import annotations

import json

from tests.unit.data.test_folder import write_folder
from tests.unit.tools.bench.test_side_by_side import bench_main


def test_folder_bench_reports_every_pipeline_against_imagefolder(tmp_path):
    data = tmp_path / "images"
    write_folder(data / "train", per_class=6, bad=False)
    write_folder(data / "val", per_class=2, bad=False)
    out = tmp_path / "bench.json"
    code = bench_main(["--dataset", "folder", "--data-dir", str(data), "--device", "cpu", "--image-size", "24",
                       "--batch-size", "4", "--num-workers", "0", "--repeats", "1", "--min-seconds", "0",
                       "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert list(result["input_folder"]) == ["imagefolder", "workers", "decode", "hf", "shards", "cache"]
    for row in result["input_folder"].values():
        assert row["img_s"] > 0 and len(row["runs"]) == 1
        assert row["vs_imagefolder"] == row["img_s"] / result["input_folder"]["imagefolder"]["img_s"]
    assert result["input_folder"]["workers"]["vs_workers"] == 1.0
    assert result["meta"]["train_images"] == 18 and result["once"]["cache_build"] > 0
    assert result["once"]["decode_torchvision"] > 0
