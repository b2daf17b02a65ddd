"""timm backbones under torchrun (2 processes, gloo): DDP, frozen-prefix transfer, layer decay, a mid-epoch
resume that ends bitwise equal, and dtl eval of the result."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from dtl import models
from tests.conftest import TINY, assert_same_weights, main_inproc, rewind_copy
from tests.e2e.test_launchers import torchrun

pytestmark = pytest.mark.slow


def test_timm_convnext_transfer_with_two_processes_then_eval(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "convnext.safetensors"
    save_file(timm.create_model("test_convnext").state_dict(), str(weights))
    out = tmp_path / "run"
    res = torchrun(2, *TINY, "--model", "timm/test_convnext", "--mode", "transfer", "--weights", str(weights),
                   "--train-subset", "32", "--eval-subset", "17", "--batch-size", "8", "--epochs", "1",
                   "--output-dir", str(out), "--dist-timeout", "60")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "model wrapped in DistributedDataParallel (gloo backend, 2 ranks)" in res.stderr
    assert "replicas in sync" in res.stderr
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["train_count"], last["test_count"]) == (32, 17)
    final = load_file(str(out / "model.safetensors"))
    assert torch.equal(final["stem.0.weight"], load_file(str(weights))["stem.0.weight"])
    assert main_inproc("eval", "--checkpoint", str(out), "--device", "cpu") == 0
    summary = json.loads(next((out / "eval").glob("*/summary.json")).read_text())
    assert summary["top1"] == pytest.approx(last["test_acc"])


def test_timm_vit_finetune_resume_mid_epoch_is_bitwise_with_two_processes(tmp_path):
    flags = [*TINY, "--model", "timm/test_vit", "--mode", "finetune", "--weights", "none", "--finetune-last-n", "3",
             "--layer-decay", "0.7", "--optimizer", "adamw", "--lr", "1e-3", "--train-subset", "64",
             "--eval-subset", "16", "--batch-size", "8", "--epochs", "2", "--checkpoint-every-steps", "3",
             "--keep-last", "20", "--dist-timeout", "60"]
    full, part = tmp_path / "full", tmp_path / "part"
    res = torchrun(2, *flags, "--output-dir", str(full))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "replicas in sync" in res.stderr
    groups = json.loads((full / "config.json").read_text())["run"]["param_groups"]
    assert {g["block"] for g in groups} == {"head", "blocks.3", "blocks.4", "blocks.5.norm1.weight"}
    rewind_copy(full, part, 3)  # 4 steps per epoch: keep step 3 (mid-epoch 1)
    res = torchrun(2, *flags, "--output-dir", str(part), "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step-00000003" in res.stderr
    a = assert_same_weights(full, part)
    torch.manual_seed(0)  # the run's initial weights (setup seeds with --seed before building)
    init = models.build_model("timm/test_vit", 10, "none", 32).state_dict()
    assert torch.equal(a["blocks.2.attn.qkv.weight"], init["blocks.2.attn.qkv.weight"])  # below the last 3
    assert not torch.equal(a["blocks.3.attn.qkv.weight"], init["blocks.3.attn.qkv.weight"])
