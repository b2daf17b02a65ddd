"""experiments/harness.py: runs are matched by what they compute (dtl's resolved settings), not by the name of
their config, so renamed configs and a changed --recipe reuse completed runs; the heavy-by-length table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import harness  # noqa: E402

BASE = ["--dataset", "folder", "--data-dir", "/data", "--model", "resnet18", "--weights", "/w.safetensors"]


def test_settings_not_names_decide_what_a_run_is():
    resolved = harness.resolved
    assert resolved([*BASE, "--mode", "lp-ft"]) == resolved([*BASE, "--mode", "lp-ft", "--freeze-bn-stats"])
    assert resolved([*BASE, "--mode", "lp-ft"]) != resolved([*BASE, "--mode", "lp-ft", "--no-freeze-bn-stats"])
    spelled = [f"--{k.replace('_', '-')}={v}" for k, v in harness.RECIPES["strong"].items()]
    assert resolved([*BASE, "--mode", "finetune", "--recipe", "strong"]) == resolved([*BASE, "--mode", "finetune",
                                                                                       *spelled])
    assert resolved([*BASE, "--output-dir", "/a"]) == resolved([*BASE, "--output-dir", "/b", "--overwrite"])
    json.dumps(resolved(BASE))  # what the marker stores, compared after a JSON round trip


def completed_run(folder: Path, args: list[str], acc: float) -> None:
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"state": "completed"}))
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": acc}) + "\n")
    (folder / harness.MARKER).write_text(json.dumps({"args": args, "resolved": harness.resolved(args)}))


def test_a_renamed_config_reuses_the_run_of_the_same_settings(tmp_path):
    args = [*BASE, "--mode", "lp-ft", "--freeze-bn-stats", "--seed", "1"]
    completed_run(tmp_path / "runs" / "old_name" / "seed1", args, 0.5)
    new = tmp_path / "runs" / "lp-ft" / "seed1"
    lp_ft = [*BASE, "--mode", "lp-ft", "--seed", "1"]
    assert not harness.completed(new, harness.resolved(lp_ft))
    assert harness.reuse(lp_ft, harness.resolved(lp_ft), new)
    assert harness.completed(new, harness.resolved(lp_ft)) and harness.done(lp_ft, new)
    assert harness.read_metrics(new)["final"] == 0.5
    # other settings (another seed) find nothing
    assert not harness.done([*BASE, "--mode", "lp-ft", "--seed", "2"], tmp_path / "runs" / "lp-ft" / "seed2")


def test_heavy_table_one_line_per_length_with_the_difference_to_the_recipe():
    def runs(*accs: float) -> list[dict]:
        return [{"final": a} for a in accs]

    results = {"strong, 40 epochs": runs(0.5, 0.6, 0.7), "strong +all heavy, 40 epochs": runs(0.6, 0.5, 0.8)}
    text = harness.heavy_table(results, steps_per_epoch=4)
    assert "| 40 epochs = 160 steps | 60.0 ± 10.0 | - | - | - | 63.3 ± 15.3 (+3.3, 2/3) |" in text
    assert "10 epochs" not in text
