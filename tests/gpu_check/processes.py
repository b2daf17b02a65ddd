"""Starting the check's commands and stopping them with everything they started.

Each command runs in a session of its own with its output in ``logs/<label>.log`` (whose first line is the
command, to rerun it by hand), against a deadline. torchrun starts its workers in sessions of their own, so a
process group is not enough to stop a command's processes: `process_tree` follows the parent links in /proc.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path


class TimedOut(Exception):
    """A command did not finish before the deadline (its processes were stopped)."""


def parents() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                table[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return table


def process_tree(root: int) -> list[int]:
    """root and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def alive(pid: int) -> bool:
    """Still running (a zombie waiting for its parent does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def children_running(parent: int, marker: bytes) -> list[int]:
    """The children of `parent` whose command line contains `marker`."""
    pids = []
    for pid, ppid in parents().items():
        with contextlib.suppress(OSError):
            if ppid == parent and marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


def signal_children(parent: int, marker: bytes, sig: signal.Signals) -> list[int]:
    """Send `sig` to the children of `parent` that run `marker` (torchrun's workers: the agent itself would
    take the signal as the end of the job and kill them); the pids signalled."""
    pids = children_running(parent, marker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def read_log(path: Path) -> str:
    """A log's text so far ('' before it exists)."""
    return path.read_text(errors="replace") if path.is_file() else ""


class Processes:
    """The commands one step started: each with its log, all stopped together (`stop_all`), none past
    `deadline` (time.monotonic())."""

    def __init__(self, logs: Path, cwd: Path, env: dict[str, str]) -> None:
        self.logs, self.cwd, self.env = logs, cwd, env
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = float("inf")
        self.running: dict[subprocess.Popen, str] = {}
        self.last_log: Path | None = None

    def start(self, label: str, cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        """Start `cmd` (with `env` added to the environment) in a session of its own; its output goes to
        logs/<label>.log."""
        log = self.logs / f"{label}.log"
        extra = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        with open(log, "w") as f:
            f.write(f"$ cd {shlex.quote(str(self.cwd))} && {extra + ' ' if extra else ''}{shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=self.cwd, env={**self.env, **(env or {})}, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.running[proc] = label
        self.last_log = log
        return proc, log

    def wait(self, proc: subprocess.Popen) -> int:
        """`proc`'s exit code; at the deadline every process is stopped and `TimedOut` raised."""
        try:
            return proc.wait(timeout=max(self.deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            label = self.running.get(proc, str(proc.args))
            self.stop_all()
            raise TimedOut(f"timed out waiting for {label}") from None

    def run(self, label: str, cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run to the end (or the deadline); the exit code and the log's text."""
        proc, log = self.start(label, cmd, env)
        code = self.wait(proc)
        return code, read_log(log)

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every process started here that still runs, and to their descendants; SIGKILL to what is
        left after `grace_s`."""
        running = [p for p in self.running if p.poll() is None]
        pids = [pid for p in running for pid in process_tree(p.pid)]
        for sig, grace in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            end = time.monotonic() + grace
            while time.monotonic() < end and (any(p.poll() is None for p in running) or any(map(alive, pids))):
                time.sleep(0.1)
            pids = [pid for pid in pids if alive(pid)]
        self.running = {p: label for p, label in self.running.items() if p.poll() is None}
