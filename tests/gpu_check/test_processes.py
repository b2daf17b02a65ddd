"""`tests.gpu_check.processes` on real (tiny) processes: logs, the deadline, stopping a whole tree -- also a
child in a session of its own, as torchrun starts its workers -- and signalling the workers alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gpu_check import processes
from tests.gpu_check.processes import Processes, TimedOut

PY = sys.executable
#: a parent that starts a child in a session of its own (like torchrun's workers), prints its pid, waits
TREE = ("import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', 'train.py'],"
        " start_new_session=True)\n"
        "print('pid:', child.pid, flush=True)\n"
        "time.sleep(60)\n")


def printed(log: Path, word: str) -> list[str]:
    """The lines the command printed that start with `word` (the log's first line, the command, may span
    several lines and hold the same words)."""
    return [ln for ln in processes.read_log(log).splitlines() if ln.split(" ", 1)[0] == word]


def wait_for(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path / "logs", tmp_path, dict(os.environ))
    yield p
    p.stop_all(grace_s=1.0)


def test_run_logs_the_command_first_then_its_output(procs: Processes) -> None:
    code, text = procs.run("hello", [PY, "-c", "print('hi'); raise SystemExit(3)"], env={"X_GPU_CHECK": "a b"})
    assert code == 3
    first, second = text.splitlines()[:2]
    assert first.startswith("$ cd ") and "X_GPU_CHECK='a b'" in first and "raise SystemExit(3)" in first
    assert second == "hi" and procs.last_log == procs.logs / "hello.log"


def test_stop_all_ends_the_tree_with_a_child_in_its_own_session(procs: Processes) -> None:
    proc, log = procs.start("tree", [PY, "-c", TREE])
    wait_for(lambda: printed(log, "pid:"))
    child = int(printed(log, "pid:")[0].split()[1])
    assert set(processes.process_tree(proc.pid)) == {proc.pid, child}
    assert processes.children_running(proc.pid, b"train.py") == [child]
    procs.stop_all(grace_s=5.0)
    assert proc.poll() is not None and not processes.alive(child)
    assert procs.running == {}


def test_the_deadline_stops_everything_and_raises(procs: Processes) -> None:
    proc, _ = procs.start("sleeper", [PY, "-c", "import time; time.sleep(60)"])
    procs.deadline = time.monotonic() + 0.5
    with pytest.raises(TimedOut, match="timed out waiting for sleeper"):
        procs.wait(proc)
    assert proc.poll() is not None


def test_signal_children_reaches_the_workers_not_the_agent(procs: Processes, tmp_path: Path) -> None:
    """SIGUSR1 to the agent's train.py children only: the worker exits 75 from its handler, the agent lives."""
    worker = ("import signal, sys, time\n"
              "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
              "print('ready', 'now', flush=True)\n"
              "time.sleep(60)\n")
    agent = ("import subprocess, sys\n"
             f"w = subprocess.Popen([sys.executable, '-c', {worker!r}, 'train.py'])\n"
             "print('worker', w.wait(), flush=True)\n")
    proc, log = procs.start("agent", [PY, "-c", agent])
    wait_for(lambda: printed(log, "ready"))
    assert processes.signal_children(proc.pid, b"nothing-like-this", signal.SIGUSR1) == []
    assert len(processes.signal_children(proc.pid, b"train.py", signal.SIGUSR1)) == 1
    assert procs.wait(proc) == 0
    assert printed(log, "worker") == ["worker 75"]


def test_alive_is_false_for_a_zombie_and_a_missing_pid() -> None:
    proc = subprocess.Popen([PY, "-c", "pass"])
    wait_for(lambda: not processes.alive(proc.pid))  # exited, not yet reaped: a zombie
    proc.wait()
    assert not processes.alive(proc.pid)
