"""`dtl predict` and `dtl eval` on one small trained checkpoint (shared by every test of this module).

The model: resnet18 from scratch at 32 px, 2 epochs on 480 images of the learnable synthetic set (AdamW, no
augmentation); it reaches 0.9-1.0 test accuracy (chance: 0.1; seeds 0-2 tried) in 25-45 s on a loaded
2-core CPU.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from dtl import cli
from dtl.data.cifar import make_synthetic
from dtl.train.checkpoint import format as ckpt
from tests.conftest import PY, ROOT, train_inproc

#: `dtl predict` must put the right class first for at least this fraction of held-out images (the run's
#: own test accuracy is about 0.9; chance is 0.1).
PREDICT_MIN_TOP1 = 0.8
EVAL_SUBSET = 200
N_PREDICT = 50
TEST_SEED = 1_000_003  # dtl.data: the synthetic test split of --seed 0 is make_synthetic(n, seed=1_000_003)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inference") / "run"
    code = train_inproc("--dataset", "synthetic", "--model", "resnet18", "--mode", "scratch", "--image-size", "32",
                        "--epochs", "2", "--train-subset", "480", "--no-augment", "--eval-subset", str(EVAL_SUBSET),
                        "--batch-size", "32", "--optimizer", "adamw", "--lr", "0.002", "--device", "cpu",
                        "--log-every", "1000", "--output-dir", str(out))
    assert code == 0
    return out


@pytest.fixture(scope="module")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Held-out synthetic images as PNG files (the training images come from another seed)."""
    folder = tmp_path_factory.mktemp("predict") / "images"
    (folder / "sub").mkdir(parents=True)
    split = make_synthetic(N_PREDICT, seed=TEST_SEED)
    truth = {}
    for i in range(N_PREDICT):
        path = folder / ("sub" if i % 5 == 0 else "") / f"{i:03d}.png"  # folders are searched recursively
        Image.fromarray(split.images[i].permute(1, 2, 0).numpy()).save(path)
        truth[str(path)] = split.classes[int(split.labels[i])]
    return folder, truth


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_main(*argv: str) -> int:
    return cli.main(list(argv))


# ---- predict -----------------------------------------------------------------------------------------

def test_predict_writes_csv_and_ranks_the_right_class_first(trained, test_images, tmp_path, capsys):
    folder, truth = test_images
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "preds.csv"
    assert run_main("predict", "--checkpoint", str(trained), str(folder), str(broken), "--top-k", "3",
                    "--batch-size", "16", "--device", "cpu", "--output", str(out)) == 0
    assert str(broken) in capsys.readouterr().err  # reported by path, skipped
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["path", "rank", "class", "probability"]
        rows = list(reader)
    assert len(rows) == 3 * N_PREDICT and {r["path"] for r in rows} == set(truth)
    by_path: dict[str, list[dict]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    for preds in by_path.values():
        assert [int(r["rank"]) for r in preds] == [1, 2, 3]
        probs = [float(r["probability"]) for r in preds]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    right = sum(by_path[p][0]["class"] == cls for p, cls in truth.items())
    assert right / N_PREDICT >= PREDICT_MIN_TOP1, f"{right}/{N_PREDICT} right"


def test_predict_prints_a_table_and_writes_jsonl(trained, test_images, tmp_path, capsys):
    folder, truth = test_images
    image = sorted(truth)[0]
    assert run_main("predict", "--checkpoint", str(trained), image, "--top-k", "2", "--device", "cpu") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["path", "rank", "class", "probability"] and len(lines) == 3
    assert lines[1].split()[:2] == [image, "1"]
    out = tmp_path / "preds.jsonl"
    assert run_main("predict", "--checkpoint", str(trained), image, "--top-k", "20", "--device", "cpu",
                    "--output", str(out)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and set(rows[0]) == {"path", "rank", "class", "probability"}  # k capped at 10
    assert abs(sum(r["probability"] for r in rows) - 1) < 1e-4


def test_predict_refuses_bad_input(trained, tmp_path, capsys):
    assert run_main("predict", "--checkpoint", str(trained), str(tmp_path / "missing.png")) == 2
    assert "missing.png" in capsys.readouterr().err
    (tmp_path / "junk.png").write_bytes(b"junk")
    assert run_main("predict", "--checkpoint", str(trained), str(tmp_path / "junk.png"), "--device", "cpu") == 2
    assert run_main("predict", "--checkpoint", str(tmp_path), str(tmp_path / "junk.png")) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


# ---- eval --------------------------------------------------------------------------------------------

def test_eval_reproduces_the_runs_test_accuracy(trained, tmp_path):
    last = ckpt.latest_checkpoint(trained)
    out = tmp_path / "ev"
    assert run_main("eval", "--checkpoint", str(last), "--device", "cpu", "--output-dir", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    final = metrics_rows(trained)[-1]
    assert summary["count"] == final["test_count"] == EVAL_SUBSET
    assert summary["top1"] == final["test_acc"]  # same images, same preprocessing, same model
    assert summary["loss"] == pytest.approx(final["test_loss"], rel=1e-4)
    assert summary["top1"] <= summary["top5"] <= 1
    assert sum(c["count"] for c in summary["per_class"]) == EVAL_SUBSET
    with open(out / "confusion_matrix.csv", newline="") as f:
        table = list(csv.reader(f))
    classes = summary["classes"]
    assert table[0][1:] == classes and [r[0] for r in table[1:]] == classes
    matrix = [[int(v) for v in r[1:]] for r in table[1:]]
    assert sum(map(sum, matrix)) == EVAL_SUBSET
    assert sum(matrix[i][i] for i in range(len(classes))) == summary["correct"]
    assert (out / "confusion_matrix.png").stat().st_size > 5_000
    assert (out / "per_class.csv").read_text().startswith("class,count,correct,accuracy")

    # a run folder means its best checkpoint; the default output folder is RUN/eval/<checkpoint>
    assert run_main("eval", "--checkpoint", str(trained), "--device", "cpu", "--eval-subset", "40") == 0
    best = json.loads((trained / "checkpoints" / "best.json").read_text())["checkpoint"]
    summary = json.loads((trained / "eval" / best / "summary.json").read_text())
    assert summary["count"] == 40 and summary["checkpoint"].endswith(best)


def test_eval_with_flip_tta_prints_and_saves_both_numbers(trained, tmp_path, capsys):
    last = ckpt.latest_checkpoint(trained)
    out = tmp_path / "ev"
    assert run_main("eval", "--checkpoint", str(last), "--device", "cpu", "--tta", "flip", "-o", str(out)) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    final = metrics_rows(trained)[-1]
    assert summary["tta"] == "flip" and summary["plain"]["top1"] == final["test_acc"]  # the run had no TTA
    assert f"plain: top-1 {final['test_acc']:.4f}" in printed
    assert f"top-1 {summary['top1']:.4f}" in printed and "with --tta flip" in printed
    assert summary["count"] == EVAL_SUBSET and summary["loss"] != summary["plain"]["loss"]


def test_eval_refuses_a_folder_without_checkpoints(tmp_path, capsys):
    assert run_main("eval", "--checkpoint", str(tmp_path), "--device", "cpu") == 2
    assert "no complete checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_in_two_processes_matches_one(trained, tmp_path):
    """torchrun with 2 CPU processes: contiguous shards, sums all-reduced; the same numbers as 1 process."""
    import subprocess

    last = ckpt.latest_checkpoint(trained)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_main("eval", "--checkpoint", str(last), "--device", "cpu", "--output-dir", str(one)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dtl.cli", "eval", "--checkpoint", str(last), "--device", "cpu",
                           "--output-dir", str(two)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((one / "summary.json").read_text())
    b = json.loads((two / "summary.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    for key in ("count", "correct", "top1", "top5", "per_class"):
        assert a[key] == b[key], key
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert (one / "confusion_matrix.csv").read_text() == (two / "confusion_matrix.csv").read_text()
