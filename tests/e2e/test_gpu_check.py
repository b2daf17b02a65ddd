"""`make gpu-check` (launch/gpu_check.sh -> launch/gpu_check.py): its refusal without CUDA, and its whole flow
on the CPU (GPU_CHECK_CPU_SMOKE=1: tiny models, gloo instead of NCCL)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "launch" / "gpu_check.sh"
STEPS = ["inputs", "bf16_nccl_transfer", "fp16_overflow", "preempt_resume", "compile_recompiles", "cache_features",
         "fsdp_resume", "speed", "bench", "pytest_cuda"]


def check_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The check's environment: this interpreter, no GPU visible (also on a GPU machine), one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    env |= {"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "GPU_CHECK_DIR": str(tmp_path / "check"), **extra}
    return env


def test_refuses_without_cuda_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPT)], env=check_env(tmp_path), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1, lines
    assert "no CUDA device visible" in lines[0] and "GPU machine" in lines[0]
    assert not (tmp_path / "check").exists()  # nothing was written


def test_unknown_step_name_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPT)], env=check_env(tmp_path, GPU_CHECK_CPU_SMOKE="1",
                                                                GPU_CHECK_STEPS="bench,nope"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown step(s) in GPU_CHECK_STEPS: nope" in proc.stderr


@pytest.mark.slow
def test_cpu_smoke_run_passes_every_step_or_says_why_not(tmp_path: Path) -> None:
    env = check_env(tmp_path, GPU_CHECK_CPU_SMOKE="1", OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    report = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == report
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    table = output[re.search(r"^step +result +seconds +figures$", output, re.MULTILINE).start():]  # printed last
    for name in STEPS:
        assert name in table

    failed = {name: f"{s['reason']}\n" + "\n".join(s["log_tail"] or []) for name, s in steps.items()
              if s["result"] == "FAIL"}
    assert not failed, f"steps failed in the CPU smoke run:\n{json.dumps(failed, indent=1)}\n{output[-6000:]}"
    assert proc.returncode == 0 and report["result"] == "PASS", output[-3000:]
    for name, step in steps.items():
        assert step["result"] in ("PASS", "SKIP"), name
        assert step["result"] == "PASS" or step["reason"], f"{name} was skipped without a reason"
    # what cannot run on a CPU is a SKIP with its reason, never a PASS
    assert steps["compile_recompiles"]["result"] == "SKIP"
    assert steps["pytest_cuda"]["result"] == "SKIP"
    # and the steps that ran checked what they claim
    assert steps["bf16_nccl_transfer"]["figures"]["backend"] == "gloo"
    assert steps["bf16_nccl_transfer"]["figures"]["precision"] == "bf16"
    resume = steps["preempt_resume"]["figures"]
    assert resume["status"] == "preempted" and resume["unequal_tensors"] == 0 and resume["tensors"] > 0
    assert steps["fp16_overflow"]["figures"]["precision"] == "fp16"
    fsdp = steps["fsdp_resume"]["figures"]
    assert fsdp["backend"] == "gloo" and fsdp["unequal_tensors"] == 0 and fsdp["tensors"] > 0
    assert fsdp["shard_files"] == ["shard-00001-model-00001-of-00001.safetensors"]
    assert set(steps["bench"]["figures"]) == {"squeezenet_transfer_32px", "squeezenet_finetune_32px"}
    bench_train = steps["bench"]["figures"]["squeezenet_transfer_32px"]["train_step"]
    assert bench_train["ratio_strong"] == bench_train["dtl_img_s"] / bench_train["strong_img_s"]
    # the speed table: dtl's epoch rate beside the strong loop's step rate, per case, and the cached features
    cases = steps["speed"]["figures"]["cases"]
    assert set(cases) == {"transfer_32px_b16", "finetune_32px_b16", "cached_features"}
    for label in ("transfer_32px_b16", "finetune_32px_b16"):
        assert cases[label]["epoch"] == 2 and cases[label]["ratio"] == cases[label]["dtl_img_s"] / cases[label][
            "strong_img_s"]
    assert cases["cached_features"]["dtl_img_s"] > 0 and "ratio" not in cases["cached_features"]
    assert report["profile"] == "cpu-smoke" and report["environment"]["torch"]
