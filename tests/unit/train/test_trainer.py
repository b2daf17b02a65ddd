"""End-to-end runs of the trainer in one process (the launcher tests live in test_launchers.py)."""

import json
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file

from tests.conftest import TINY, fault_env, snapshot, train_inproc

METRIC_KEYS = {"epoch", "train_loss", "train_acc", "train_count", "test_loss", "test_acc", "test_count", "lr",
               "epoch_seconds", "images_per_sec"}


def rows(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "metrics.jsonl").read_text().splitlines()]


def test_vgg16_transfer_two_epochs_end_to_end(tmp_path, synth_dir, fake_vgg16_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(fake_vgg16_home))
    out = tmp_path / "run"
    code = train_inproc("--model", "vgg16", "--mode", "transfer", "--weights", "imagenet", "--dataset", "cifar10",
                        "--data-dir", str(synth_dir), "--no-download", "--image-size", "32", "--epochs", "2",
                        "--train-subset", "96", "--eval-subset", "64", "--batch-size", "16", "--device", "cpu",
                        "--output-dir", str(out))
    assert code == 0
    lines = rows(out)
    assert [r["epoch"] for r in lines] == [1, 2]
    assert METRIC_KEYS <= set(lines[0]) and lines[0]["train_count"] == 96 and lines[0]["test_count"] == 64
    assert (out / "curves.png").stat().st_size > 10_000
    model = torchvision.models.vgg16(num_classes=10)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["model"] == "vgg16" and cfg["run"]["launcher"] == "python"
    assert {"world_size", "device", "precision", "versions"} <= set(cfg["run"])
    assert set(cfg["run"]["versions"]) == {"torch", "torchvision", "dtl"}
    # the frozen backbone did not move; the head did
    cached = torch.load(next((fake_vgg16_home / "hub" / "checkpoints").iterdir()), weights_only=True)
    assert torch.equal(model.features[0].weight, cached["features.0.weight"])
    assert torch.equal(model.classifier[3].weight, cached["classifier.3.weight"])
    state = json.loads((out / "checkpoints" / "step-00000012" / "state.json").read_text())
    assert state["config"]["mode"] == "transfer" and state["trainable"] == ["classifier.6.weight",
                                                                             "classifier.6.bias"]
    assert json.loads((out / "status.json").read_text())["state"] == "completed"


def test_small_backbone_learns_the_synthetic_set(tmp_path):
    out = tmp_path / "run"
    code = train_inproc(*TINY, "--model", "resnet18", "--epochs", "2", "--train-subset", "384",
                        "--eval-subset", "200", "--batch-size", "32", "--output-dir", str(out))
    assert code == 0
    last = rows(out)[-1]
    assert last["test_acc"] > 0.5, last  # chance is 0.1


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    common = [*TINY, "--train-subset", "64", "--eval-subset", "32",
              "--seed", "3"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_inproc(*common, "--epochs", "2", "--output-dir", str(full)) == 0
    assert train_inproc(*common, "--epochs", "1", "--output-dir", str(split)) == 0
    assert train_inproc(*common, "--epochs", "2", "--output-dir", str(split), "--resume", "auto") == 0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in rows(split)] == [1, 2]
    assert rows(split)[1]["train_loss"] == rows(full)[1]["train_loss"]


def test_existing_run_is_not_clobbered(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "1", "--train-subset", "32",
            "--eval-subset", "16", "--output-dir", str(out)]
    assert train_inproc(*args) == 0
    before = snapshot(out)
    assert train_inproc(*args) == 2
    assert snapshot(out) == before
    assert train_inproc(*args, "--resume", "auto") == 0  # already finished: nothing to do, still fine
    assert [r["epoch"] for r in rows(out)] == [1]


def test_wrong_checkpoint_for_this_model_is_refused(tmp_path, capfd):
    out = tmp_path / "run"
    assert train_inproc(*TINY, "--epochs", "1", "--train-subset", "32", "--eval-subset", "16",
                        "--output-dir", str(out)) == 0
    before = snapshot(out)
    code = train_inproc(*TINY, "--model", "alexnet", "--mode", "scratch", "--epochs", "2", "--train-subset", "32",
                        "--eval-subset", "16", "--image-size", "64", "--output-dir", str(out), "--resume", "auto")
    assert code == 2
    err = capfd.readouterr().err
    assert "squeezenet1_1" in err and "alexnet" in err
    assert snapshot(out) == before


def test_debug_runs_one_small_epoch(tmp_path):
    out = tmp_path / "run"
    assert train_inproc(*TINY, "--debug", "--epochs", "4",
                        "--output-dir", str(out)) == 0
    (row,) = rows(out)
    assert row["train_count"] == 256 and json.loads((out / "config.json").read_text())["run"]["launcher"] == "debug"


def test_grad_accumulation_matches_the_larger_batch(tmp_path):
    """2 micro-batches of 4 (gradients summed, then one step) vs one batch of 8: same weights within float
    tolerance (no BatchNorm, no dropout, no augmentation)."""
    common = [*TINY, "--epochs", "1", "--train-subset", "32", "--eval-subset", "8", "--no-augment",
              "--dropout", "0", "--lr", "0.01"]
    assert train_inproc(*common, "--batch-size", "8", "--output-dir", str(tmp_path / "big")) == 0
    assert train_inproc(*common, "--batch-size", "4", "--grad-accum", "2", "--output-dir", str(tmp_path / "acc")) == 0
    a = load_file(str(tmp_path / "big" / "model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    cfg = json.loads((tmp_path / "acc" / "config.json").read_text())
    assert cfg["run"]["global_batch"] == 8


FP16 = [*TINY, "--precision", "fp16", "--train-subset", "48", "--eval-subset", "16", "--epochs", "1"]


def test_fp16_overflow_steps_are_skipped_and_the_scale_shrinks(tmp_path):
    out = tmp_path / "run"
    assert train_inproc(*FP16, "--fp16-init-scale", "1e38", "--output-dir", str(out)) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["overflow_skips"] >= 1
    assert row["loss_scale"] < 1e38
    assert json.loads((out / "status.json").read_text())["state"] == "completed"


def test_fp16_real_nan_loss_still_aborts(tmp_path, capfd):
    out = tmp_path / "run"
    code = train_inproc(*FP16, "--output-dir", str(out), env=fault_env(1, "nan"))
    assert code == 1
    assert "non-finite loss at global step 1" in capfd.readouterr().err
