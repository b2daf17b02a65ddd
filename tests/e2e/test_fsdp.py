"""--strategy fsdp under torchrun (gloo, CPU): one fixed-seed FSDP run of a tiny timm ViT with every feature
that touches the gradients or the weights (last-n blocks, layer decay, gradient accumulation, clipping, EMA),
compared with the same run under DDP, resumed mid-epoch at the same world size (bitwise) and at another
(2 -> 3 processes, the same global batch: equal up to summation order), and read back by `dtl eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.conftest import PY, assert_same_weights, main_inproc, rewind_copy
from tests.e2e.test_launchers import launch, torchrun

pytestmark = pytest.mark.slow
#: 96 images, global batch 24 (2 ranks x 6 x 2 micro-steps, or 3 x 4 x 2): 4 steps per epoch. No augmentation
#: and no dropout, so that each global step sees the same images at any world size (interleaved shards).
FLAGS = ["--dataset", "synthetic", "--image-size", "32", "--device", "cpu", "--log-every", "1",
         "--model", "timm/test_vit", "--mode", "finetune", "--weights", "none", "--finetune-last-n", "4",
         "--layer-decay", "0.8", "--ema-decay", "0.9", "--clip-grad-norm", "0.5", "--grad-accum", "2",
         "--optimizer", "adamw", "--lr", "1e-3", "--epochs", "2", "--train-subset", "96", "--eval-subset", "33",
         "--no-augment", "--dropout", "0", "--checkpoint-every-steps", "3", "--keep-last", "20",
         "--dist-timeout", "60"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    res = torchrun(2, *FLAGS, "--batch-size", "6", "--strategy", "fsdp", "--output-dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "model sharded with FSDP2" in res.stderr
    return out


def test_fsdp_equals_ddp_up_to_summation_order_and_resumes_bitwise(fsdp_run, tmp_path):
    ddp = tmp_path / "ddp"
    res = torchrun(2, *FLAGS, "--batch-size", "6", "--output-dir", str(ddp))
    assert res.returncode == 0, res.stderr[-3000:]
    for a, b in zip(_rows(ddp), _rows(fsdp_run)):
        for key in ("train_loss", "test_loss", "test_loss_ema", "grad_norm_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(ddp / name)), load_file(str(fsdp_run / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=1e-4)
    part = tmp_path / "part"
    rewind_copy(fsdp_run, part, 6)  # mid-epoch 2
    ckpt = part / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    res = torchrun(2, *FLAGS, "--batch-size", "6", "--strategy", "fsdp", "--output-dir", str(part), "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step-00000006" in res.stderr
    assert_same_weights(fsdp_run, part, "model.safetensors", "model_ema.safetensors")


def test_fsdp_reshards_two_to_three_and_its_weights_are_plain_timm(fsdp_run, tmp_path, capsys):
    part = tmp_path / "part"
    rewind_copy(fsdp_run, part, 6)
    res = torchrun(3, *FLAGS, "--batch-size", "4", "--strategy", "fsdp", "--output-dir", str(part), "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "re-sharded" in res.stderr and "from 2 to 3 ranks" in res.stderr
    full, resumed = load_file(str(fsdp_run / "model.safetensors")), load_file(str(part / "model.safetensors"))
    before = load_file(str(fsdp_run / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert any(not torch.equal(full[k], before[k]) for k in full)  # the last two steps trained...
    for key in full:  # ...the same at 3 ranks as at 2
        torch.testing.assert_close(resumed[key], full[key], atol=2e-6, rtol=1e-5)
    timm.create_model("test_vit", num_classes=10, img_size=32).load_state_dict(full)  # one file, timm's keys
    assert main_inproc("eval", "--checkpoint", str(fsdp_run), "--device", "cpu") == 0
    summary = json.loads(next((fsdp_run / "eval").glob("*/summary.json")).read_text())
    assert summary["top1"] == pytest.approx(_rows(fsdp_run)[-1]["test_acc"])


def test_fsdp_at_four_ranks_holds_a_quarter_of_ddps_state_per_rank():
    """experiments/fsdp_memory.py (parameters, gradients, AdamW state per rank after one step) at 4 processes."""
    res = launch([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "experiments/fsdp_memory.py",
                  "--model", "timm/test_vit", "--image-size", "32", "--strategy", "both"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    state = {(r["strategy"], r["rank"]): r["params"] + r["grads"] + r["optimizer"] for r in rows}
    assert len(state) == 8
    for rank in range(4):
        assert state[("fsdp", rank)] <= 0.3 * state[("ddp", rank)]
    assert sum(state[("fsdp", r)] for r in range(4)) >= state[("ddp", 0)]  # the shards add up to the model
