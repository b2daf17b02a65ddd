"""`make gpu-check` (`python -m tests.gpu_check`) for real: its refusals, and one short run of the driver on the
CPU (GPU_CHECK_CPU_SMOKE=1, one torchrun step on gloo). The steps' verdicts on recorded run folders, the
process handling and the report are tested in tests/gpu_check/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.gpu_check.steps import STEPS

NAMES = [name for name, _, _ in STEPS]


def check_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The check's environment: this interpreter, the repository importable, no GPU visible (also on a GPU
    machine), one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    env |= {"PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "GPU_CHECK_DIR": str(tmp_path / "check"), **extra}
    return env


def gpu_check(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.gpu_check"], env=check_env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_refuses_without_cuda_in_one_line(tmp_path: Path) -> None:
    proc = gpu_check(tmp_path)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1, lines
    assert "no CUDA device visible" in lines[0] and "GPU machine" in lines[0]
    assert not (tmp_path / "check").exists()  # nothing was written


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_refuses_an_unknown_step(tmp_path: Path) -> None:
    env = check_env(tmp_path, GPU_CHECK_CPU_SMOKE="1", GPU_CHECK_STEPS="bench,nope")
    del env["PYTHONPATH"]  # the Makefile puts the repository there
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), "gpu-check", f"PYTHON={sys.executable}"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "gpu-check: unknown step(s) in GPU_CHECK_STEPS: nope; steps: inputs," in proc.stderr
    assert not (tmp_path / "check").exists()


@pytest.mark.slow
def test_one_step_on_the_cpu_runs_the_whole_driver(tmp_path: Path) -> None:
    """inputs (weights for this step's model only, the synthetic data) and bf16_nccl_transfer under torchrun at
    world size 1 (gloo); every other step a SKIP with its reason; the table, the JSON report and its copy."""
    proc = gpu_check(tmp_path, GPU_CHECK_CPU_SMOKE="1", GPU_CHECK_STEPS="bf16_nccl_transfer",
                     OUT=str(tmp_path / "out"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    report = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == report
    assert (report["result"], report["profile"], report["budget_s"]) == ("PASS", "cpu-smoke", 480.0)
    assert report["environment"]["torch"]
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == NAMES
    table = output[re.search(r"^step +result +seconds +figures$", output, re.MULTILINE).start():]  # printed last
    assert all(name in table for name in NAMES)
    assert steps["inputs"]["result"] == "PASS"
    assert steps["inputs"]["figures"]["weights"].startswith("squeezenet1_1 ")  # no other model's weights
    assert steps["inputs"]["figures"]["synth_images"] == "512+128"
    bf16 = steps["bf16_nccl_transfer"]
    assert bf16["result"] == "PASS", bf16
    assert (bf16["figures"]["backend"], bf16["figures"]["precision"], bf16["figures"]["epochs"]) == ("gloo", "bf16", 1)
    for name in NAMES[2:]:
        assert (steps[name]["result"], steps[name]["reason"]) == ("SKIP", "not in GPU_CHECK_STEPS"), name
    log = (tmp_path / "check" / "logs" / "bf16_nccl_transfer.log").read_text()
    assert log.startswith("$ cd ") and "DTL_FORCE_DISTRIBUTED=1" in log.splitlines()[0]
