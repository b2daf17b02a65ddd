"""Shared fixtures: generated data and weights (never the network), and in-process / subprocess runners."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
import torch

# One thread per process: the suite runs two pytest workers (and two-process launches) on two cores, and
# oversubscribed OpenMP threads spin-wait, which made CPU steps several times slower when measured here.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
#: A small, fast configuration used wherever a test is not about VGG16 itself (squeezenet1_1: no
#: BatchNorm, about 7x faster than resnet18 per image on this CPU).
TINY = ["--dataset", "synthetic", "--image-size", "32", "--device", "cpu", "--batch-size", "16",
        "--log-every", "1", "--model", "squeezenet1_1", "--mode", "scratch"]


#: set on a test item whose setup or call failed (read by `_isolate`'s teardown, which runs after both reports)
_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[None]:
    """No test may reach the network or the user's torch cache; a passed test's files go when it ends.

    The suite writes VGG16 checkpoints and exports (hundreds of MB each); kept until the session ends, as
    pytest does, they filled a CI machine's disk (16 GB for one run), so only failed tests keep theirs.
    """
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args, **kwargs):
        import urllib.error

        raise urllib.error.URLError("offline (tests never download)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
                "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(var, raising=False)
    yield
    if not request.node.stash.get(_FAILED, False):
        shutil.rmtree(tmp_path, ignore_errors=True)


def fault_env(step: int, kind: str = "nan", rank: int | None = None) -> dict[str, str]:
    """The environment that makes `dtl.faults` inject a fault (see its docstring)."""
    env = {"DTL_FAULT_STEP": str(step), "DTL_FAULT_KIND": kind}
    if rank is not None:
        env["DTL_FAULT_RANK"] = str(rank)
    return env


def train_inproc(*flags: str, env: dict[str, str] | None = None) -> int:
    """Run `dtl train` in this process (no interpreter start-up); returns the exit code. `env`: extra
    environment variables for this run only (e.g. `fault_env(...)`)."""
    from dtl import cli
    from dtl.distributed import signals

    saved = {s: signal.getsignal(s) for s in signals.HANDLED}
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return cli.main(["train", *flags])
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        signals.reset()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main_inproc(*args: str) -> int:
    """`dtl ARGS` in this process (pair with capsys); returns the exit code."""
    from dtl import cli

    try:
        return cli.main(list(args))
    except SystemExit as done:  # argparse: --help, bad flags
        return int(done.code or 0)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None,
            module: bool = True) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "dtl.cli", *args] if module else list(args)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def rewind_copy(full: Path, part: Path, step: int) -> None:
    """`part` := the run folder `full` as it stood when its checkpoint of `step` was the newest: the later
    checkpoints and the final outputs removed (what a run killed right after that checkpoint leaves)."""
    import shutil

    shutil.copytree(full, part)
    for ckpt in (part / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    for name in ("model.safetensors", "model_ema.safetensors", "status.json", "checkpoints/best.json"):
        (part / name).unlink(missing_ok=True)


def assert_same_weights(full: Path, part: Path, *names: str) -> dict[str, torch.Tensor]:
    """The weight files `names` (default model.safetensors) of two run folders hold bitwise equal tensors under
    the same keys; returns `full`'s first."""
    from safetensors.torch import load_file

    first = None
    for name in names or ("model.safetensors",):
        a, b = load_file(str(full / name)), load_file(str(part / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        first = a if first is None else first
    return first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of everything below folder, to assert that nothing changed."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small learnable data set in the official CIFAR-10 python layout, written by `dtl data synth`."""
    out = tmp_path_factory.mktemp("synth")
    from dtl.data import cifar

    cifar.write_cifar10(out, cifar.make_synthetic(600, seed=0), cifar.make_synthetic(203, seed=7), "py")
    return out


@pytest.fixture(scope="session")
def fake_vgg16_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME whose hub cache holds a random VGG16 ImageNet state dict under torchvision's file name."""
    import torchvision

    home = tmp_path_factory.mktemp("torch_home")
    ckpt_dir = home / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.vgg16().state_dict()
    url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    torch.save(state, ckpt_dir / url.rsplit("/", 1)[-1])
    return home
