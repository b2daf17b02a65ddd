"""What clusters do to jobs: signals, kill -9, NaNs, dying ranks, bad input, untrusted files."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtl.data import cifar
from dtl.train.checkpoint import format as ckpt
from tests.conftest import PY, ROOT, TINY, fault_env, snapshot, train_inproc

# 2 ranks x batch 8: 32 optimizer steps per epoch, long enough to land a signal in the middle
SIGNAL_RUN = [*TINY, "--epochs", "2", "--train-subset", "512", "--eval-subset", "40", "--batch-size", "8",
              "--checkpoint-every-steps", "2", "--keep-last", "50"]


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def torchrun_cmd(*args: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def wait_for(predicate, timeout: float = 120, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def epochs_of(outdir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (outdir / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def reference_2proc(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    res = subprocess.run(torchrun_cmd(*SIGNAL_RUN, "--output-dir", str(out)), cwd=ROOT, capture_output=True,
                         text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_mid_epoch_checkpoints_and_resumes_bitwise(tmp_path, reference_2proc, sig):
    out = tmp_path / "run"
    proc = start(torchrun_cmd(*SIGNAL_RUN, "--output-dir", str(out)))
    wait_for(lambda: (out / "checkpoints" / "step-00000002").exists(), what="the first checkpoint")
    workers = children(proc.pid)
    assert len(workers) == 2
    sent = time.monotonic()
    if sig == "SIGTERM":  # what a scheduler sends the job; torchrun forwards it to the workers
        proc.send_signal(signal.SIGTERM)
    else:  # SLURM's --signal=B:USR1 trap forwards it to the trainer processes
        for pid in workers:
            os.kill(pid, signal.SIGUSR1)
    log = proc.communicate(timeout=120)[0]
    assert time.monotonic() - sent < 20
    assert log.count(f"stopped by {sig} at global step") == 2, log[-3000:]  # both ranks, same step
    assert "exit code 75" in log
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "preempted" and status["exit_code"] == 75
    last = ckpt.latest_checkpoint(out)
    meta = ckpt.load_checkpoint(last)["meta"]  # complete and verified
    assert meta["progress"]["step_in_epoch"] > 0 or meta["progress"]["epoch"] > 0
    stopped_at = meta["global_step"]
    assert 2 < stopped_at < 64

    res = subprocess.run(torchrun_cmd(*SIGNAL_RUN, "--output-dir", str(out), "--resume", "auto"), cwd=ROOT,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {last}" in res.stderr
    assert epochs_of(out) == [1, 2]
    assert same_weights(out, reference_2proc)


@pytest.mark.slow
def test_kill_minus_nine_at_random_moments_never_loses_a_checkpoint(tmp_path):
    args = [PY, "train.py", *TINY, "--epochs", "3", "--train-subset", "128", "--eval-subset", "16",
            "--checkpoint-every-steps", "1", "--keep-last", "2", "--seed", "9"]
    ref = tmp_path / "ref"
    assert train_inproc(*args[2:], "--output-dir", str(ref)) == 0
    out = tmp_path / "run"
    rng = random.Random(1234)
    torn = 0
    for attempt in range(10):
        resume = ["--resume", "auto"] if attempt else []
        proc = start([*args, "--output-dir", str(out), *resume], env={"DTL_TEST_SLOW_WRITES": "0.15"})
        wait_for(lambda p=proc: (out / "status.json").exists() and p.poll() is None, what="training to start")
        time.sleep(rng.uniform(0.2, 2.5))
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process tree, no chance to clean up
        proc.communicate()
        torn += any((out / "checkpoints").glob(".tmp-*"))
        last = ckpt.latest_checkpoint(out)
        if last is not None:
            ckpt.load_checkpoint(last)  # whatever is listed is complete and verifies
    assert train_inproc(*args[2:], "--output-dir", str(out), "--resume", "auto") == 0
    assert epochs_of(out) == [1, 2, 3]
    assert same_weights(out, ref)
    print(f"{torn} of 10 kills left a half-written checkpoint behind (ignored on resume)")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_and_is_named(tmp_path, kind):
    out = tmp_path / "run"
    t0 = time.monotonic()
    res = subprocess.run(torchrun_cmd(*TINY, "--epochs", "1", "--train-subset", "128", "--eval-subset", "16",
                                      "--batch-size", "8", "--checkpoint-every-steps", "2", "--output-dir",
                                      str(out), "--dist-timeout", "60"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, **fault_env(4, kind, rank=1)})
    assert res.returncode != 0 and time.monotonic() - t0 < 60 + 30
    text = res.stdout + res.stderr
    assert "rank      : 1" in text and ("Signal 9" in text or "SIGKILL" in text if kind == "kill"
                                          else "injected fault" in text)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(out))  # the last complete checkpoint stays valid


def test_nan_abort_saves_nothing_broken_and_names_the_step(tmp_path, capfd):
    out = tmp_path / "run"
    code = train_inproc(*TINY, "--epochs", "1", "--train-subset", "96", "--eval-subset", "16",
                        "--checkpoint-every-steps", "1", "--keep-last", "10", "--output-dir", str(out),
                        env=fault_env(3))
    assert code == 1
    err = capfd.readouterr().err
    assert "non-finite loss at global step 3" in err and "step-00000003" in err
    steps = [int(p.name.split("-")[1]) for p in ckpt.complete_checkpoints(out)]
    assert steps == [1, 2, 3]
    assert json.loads((out / "status.json").read_text())["state"] == "failed"


def test_nan_skip_drops_the_update_and_counts_it(tmp_path):
    out = tmp_path / "run"
    assert train_inproc(*TINY, "--epochs", "1", "--train-subset", "96", "--eval-subset", "16", "--output-dir",
                        str(out), "--nan-policy", "skip", env=fault_env(3)) == 0
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["nan_skips"] == 1 and row["train_count"] == 96 - 16 and row["train_loss"] == row["train_loss"]
    out2 = tmp_path / "run2"
    assert train_inproc(*TINY, "--epochs", "1", "--train-subset", "96", "--eval-subset", "16", "--output-dir",
                        str(out2), "--nan-policy", "skip", "--max-nan-skips", "1", env=fault_env(3)) == 0
    assert train_inproc(*TINY, "--epochs", "1", "--train-subset", "96", "--eval-subset", "16", "--output-dir",
                        str(tmp_path / "run3"), "--nan-policy", "skip", "--max-nan-skips", "1",
                        "--lr", "1e30", env=fault_env(3, "nan")) == 1  # NaN every step


# ---- bad input: exit 2, one clear message, nothing written or overwritten -----------------------------

def _corrupt_latest(out: Path, how: str) -> None:
    last = ckpt.latest_checkpoint(out)
    if how == "format":
        state = json.loads((last / "state.json").read_text())
        state["format_version"] = 0
        (last / "state.json").write_text(json.dumps(state))
    elif how == "classes":
        state = json.loads((last / "state.json").read_text())
        state["num_classes"] = 5
        (last / "state.json").write_text(json.dumps(state))
    else:
        f = last / "model.safetensors"
        raw = bytearray(f.read_bytes())
        if how == "truncate":
            raw = raw[: len(raw) // 2]
        else:
            raw[len(raw) - 100] ^= 0x04
        f.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    assert train_inproc(*TINY, "--epochs", "1", "--train-subset", "32", "--eval-subset", "16",
                        "--output-dir", str(out)) == 0
    return out


@pytest.mark.parametrize("how,message", [("format", "format version 0"), ("classes", "with 5 classes"),
                                         ("truncate", "damaged"), ("bitflip", "corrupt")])
def test_bad_checkpoints_are_refused(tmp_path, finished_run, capfd, how, message):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _corrupt_latest(out, how)
    before = snapshot(out)
    assert train_inproc(*TINY, "--epochs", "2", "--train-subset", "32", "--eval-subset", "16",
                        "--output-dir", str(out), "--resume", "auto") == 2
    assert message in capfd.readouterr().err
    assert snapshot(out) == before


def _bad_data(tmp_path: Path, kind: str) -> Path:
    data = tmp_path / "data"
    split = cifar.make_synthetic(40)
    if kind == "labels":
        split.labels[0] = 10
    folder = cifar.write_cifar10(data, split, cifar.make_synthetic(10), "bin")
    if kind == "missing":
        (folder / "data_batch_3.bin").unlink()
    if kind == "truncated":
        f = folder / "test_batch.bin"
        f.write_bytes(f.read_bytes()[:-5])
    return data


def _evil_pth(tmp_path: Path) -> Path:
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"classifier.6.weight": Evil()}))
    return path


BAD_INPUTS = {
    "unknown model": (["--model", "vgg61"], "did you mean vgg19, vgg16"),
    "transfer without weights": (["--mode", "transfer", "--weights", "none"], "frozen *random* backbone"),
    "zero batch": (["--batch-size", "0"], "batch_size must be > 0, got 0"),
    "negative epochs": (["--epochs", "-1"], "epochs must be > 0, got -1"),
    "image too small": (["--model", "vgg16", "--image-size", "16"], "too small"),
    "missing batch": (["--dataset", "cifar10", "--no-download", "DATA:missing"], "data_batch_3.bin is missing"),
    "truncated batch": (["--dataset", "cifar10", "--no-download", "DATA:truncated"], "truncated"),
    "labels out of range": (["--dataset", "cifar10", "--no-download", "DATA:labels"], "labels range"),
    "untrusted pickle": (["--model", "vgg16", "--mode", "finetune", "--weights", "EVIL"], "pickled code is refused"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exit_2_and_nothing_written(tmp_path, capfd, case):
    flags, message = BAD_INPUTS[case]
    resolved = []
    for flag in flags:
        if flag.startswith("DATA:"):
            resolved += ["--data-dir", str(_bad_data(tmp_path, flag[5:]))]
        elif flag == "EVIL":
            resolved.append(str(_evil_pth(tmp_path)))
        else:
            resolved.append(flag)
    out = tmp_path / "out"
    assert train_inproc(*TINY, *resolved, "--output-dir", str(out)) == 2
    assert message in capfd.readouterr().err
    assert not out.exists()
    assert not (tmp_path / "marker").exists()


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("options,message", [("ro,size=8m", "Read-only file system"),
                                             ("size=1m", "MiB free but checkpoints")])
def test_read_only_or_full_output_disk_fails_before_training(tmp_path, capfd, options, message):
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, options):
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        code = train_inproc(*TINY, "--epochs", "1", "--train-subset", "32", "--output-dir", str(mnt / "run"))
        assert code == 2
        assert message in capfd.readouterr().err
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
