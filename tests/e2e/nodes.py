"""Two 'nodes' on one machine: two torchrun agents (`--nnodes 2`) that meet on localhost, each with its own
arguments, environment, working folder and TMPDIR -- what a two-node job is, minus the network. The rendezvous
is static, so node i holds ranks from i * nproc_per_node on, as on a cluster whose launcher passes --node_rank
(c10d would rank the agents by arrival). Tests give each node its own data path, output folder or caches and
inject faults on one of them (`tests.conftest.fault_env`), then check what each node's log says and that
every process ended.

    results = run_nodes(tmp_path, [args_for_node0, args_for_node1], envs=[{}, fault_env(3, "raise")])
    assert all(r.returncode != 0 for r in results)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import PY, ROOT, free_port


@dataclass(frozen=True)
class NodeResult:
    """How one node's agent ended: its exit code, its whole log (stdout + stderr of the agent and its
    workers) and how long it ran."""

    node: int
    returncode: int
    log: str
    seconds: float
    folder: Path
    """The node's own working folder (its TMPDIR is `folder / "tmp"`)."""


def node_folder(tmp_path: Path, node: int) -> Path:
    folder = tmp_path / f"node{node}"
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    return folder


def start_nodes(tmp_path: Path, args: Sequence[Sequence[str]], envs: Sequence[dict[str, str]] | None = None,
                nproc_per_node: int = 1, script: str = "train.py") -> tuple[list[subprocess.Popen], list[Path]]:
    """Start one torchrun agent per entry of `args` (node rank = its index), in sessions of their own so a
    test can signal or kill a node's whole process tree (`os.killpg(proc.pid, ...)`). Each node's working
    directory is the repository (train.py takes paths as given), its TMPDIR and log files its own folder."""
    port = free_port()
    procs, folders = [], []
    for node, node_args in enumerate(args):
        folder = node_folder(tmp_path, node)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(folder / "tmp"),
               **((envs or [{}] * len(args))[node])}
        cmd = [PY, "-m", "torch.distributed.run", f"--nnodes={len(args)}", f"--node_rank={node}",
               f"--nproc_per_node={nproc_per_node}", "--rdzv_backend=static", "--master_addr=127.0.0.1",
               f"--master_port={port}", "--max_restarts=0", script, *node_args]
        log = open(folder / "log.txt", "w")  # noqa: SIM115 - closed by finish_nodes
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        log.close()  # the child holds its own copy of the descriptor
        folders.append(folder)
    return procs, folders


def finish_nodes(procs: list[subprocess.Popen], folders: list[Path], timeout: float,
                 started: float) -> list[NodeResult]:
    """Wait for every agent, up to `timeout` seconds after `started` in all; agents still running then are
    killed with their process trees (SIGKILL: they report -9, and the test fails on that)."""
    results = []
    for node, (proc, folder) in enumerate(zip(procs, folders)):
        try:
            proc.wait(timeout=max(1.0, started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            proc.wait()
        results.append(NodeResult(node, proc.returncode, (folder / "log.txt").read_text(errors="replace"),
                                  time.monotonic() - started, folder))
    return results


def run_nodes(tmp_path: Path, args: Sequence[Sequence[str]], envs: Sequence[dict[str, str]] | None = None,
              nproc_per_node: int = 1, timeout: float = 120, script: str = "train.py") -> list[NodeResult]:
    """Run one agent per entry of `args` to the end (see `start_nodes`); their results in node order."""
    started = time.monotonic()
    procs, folders = start_nodes(tmp_path, args, envs, nproc_per_node, script)
    return finish_nodes(procs, folders, timeout, started)
