"""--mode lp-ft (`TrainedModel.set_phase`): the head alone during the probe epochs (backbone weights and
BatchNorm statistics bitwise unchanged), everything after; resumes on either side of the switch are bitwise."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from tests.conftest import TINY, assert_same_weights, rewind_copy, train_inproc


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return str(path)


def flags(weights: str) -> list[str]:
    return [*TINY, "--model", "resnet18", "--mode", "lp-ft", "--weights", weights, "--lp-epochs", "1",
            "--epochs", "2", "--train-subset", "48", "--eval-subset", "16", "--batch-size", "8", "--lr", "0.05",
            "--checkpoint-every-steps", "2", "--keep-last", "30", "--seed", "1"]


def test_probe_then_finetune(tmp_path, weights):
    out = tmp_path / "run"
    assert train_inproc(*flags(weights), "--no-freeze-bn-stats", "--output-dir", str(out)) == 0
    initial = torch.load(weights, weights_only=True)
    after_probe = load_file(str(out / "checkpoints" / "step-00000006" / "model.safetensors"))  # 6 steps/epoch
    final = load_file(str(out / "model.safetensors"))
    backbone = [k for k in initial if not k.startswith("fc.")]
    assert all(torch.equal(after_probe[k], initial[k]) for k in backbone)  # weights and BN statistics
    assert not torch.equal(after_probe["fc.weight"], final["fc.weight"])
    changed = [k for k in backbone if not torch.equal(final[k], initial[k])]
    assert "conv1.weight" in changed and "layer1.0.bn1.running_mean" in changed  # fine-tuned, BN trained


@pytest.mark.parametrize("keep", [3, 8])  # a checkpoint during the probe, and one after the switch
def test_resume_on_either_side_of_the_switch_is_bitwise(tmp_path, weights, keep):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_inproc(*flags(weights), "--output-dir", str(full)) == 0
    rewind_copy(full, part, keep)
    assert train_inproc(*flags(weights), "--output-dir", str(part), "--resume", "auto") == 0
    assert_same_weights(full, part)


def test_probe_epochs_learn_at_lp_lr_mult_times_the_rate(tmp_path, weights):
    out = tmp_path / "run"
    assert train_inproc(*flags(weights), "--lp-lr-mult", "2", "--output-dir", str(out)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "test_acc" in r]
    assert lrs == pytest.approx([0.1, 0.05])  # --lr 0.05: x2 while probing, then the rate itself


def test_lp_ft_keeps_every_running_statistic_while_the_weights_train(tmp_path, weights):
    """--freeze-bn-stats, lp-ft's default: the statistics the probe's head was fit under stay as loaded."""
    out = tmp_path / "run"
    assert train_inproc(*flags(weights), "--output-dir", str(out)) == 0
    initial = torch.load(weights, weights_only=True)
    final = load_file(str(out / "model.safetensors"))
    stats = [k for k in initial if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(final[k], initial[k]) for k in stats)
    assert not torch.equal(final["layer1.0.bn1.weight"], initial["layer1.0.bn1.weight"])  # affine trains
    assert not torch.equal(final["conv1.weight"], initial["conv1.weight"])
