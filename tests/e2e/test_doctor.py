"""`dtl doctor` under real launchers on CPU (gloo): torchrun with 2 processes, 2 "nodes" on localhost, and a
rank that never joins (a one-line verdict and exit 1 within the timeout, no hang)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import PY, ROOT, free_port

pytestmark = pytest.mark.slow
QUICK = ["-m", "dtl.cli", "doctor", "--sizes-mb", "0.25,1", "--iters", "2", "--timeout", "60"]


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def assert_healthy(output: str, ranks: int) -> None:
    assert f"doctor: OK: {ranks} rank(s) on 1 host(s) joined" in output, output[-3000:]
    table = output[output.index("rank local host"):]
    assert all(f"\n   {r}     {r}" in table or f"\n   {r}     0" in table for r in range(ranks)), table
    assert "size MiB" in table and "\n     0.25 " in table and "\n        1 " in table
    # ranks on one host share its CPUs: their timings are not a verdict, and the table says so
    assert "\nslow rank: not judged here: one host" in table
    assert "network env (rank 0): " in table and "MASTER_ADDR=" in table


def test_torchrun_two_processes_one_table_and_ok():
    code, output = finish(start([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *QUICK]))
    assert code == 0, output[-3000:]
    assert_healthy(output, 2)


def test_two_nodes_on_localhost():
    port = str(free_port())
    procs = [start([PY, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={i}", "--nproc_per_node=1",
                    "--master_addr=127.0.0.1", f"--master_port={port}", *QUICK]) for i in (0, 1)]
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert_healthy(results[0][1], 2)  # node 0 holds global rank 0, which prints the table


def test_a_rank_that_never_joins_is_a_one_line_verdict_within_the_timeout():
    """Rank 0 of 2 alone (rank 1 never starts): the group cannot form; exit 1 after --timeout, not a hang."""
    proc = start([PY, "-m", "dtl.cli", "doctor", "--timeout", "3"], RANK="0", LOCAL_RANK="0", WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    code, output = finish(proc, timeout=90)
    assert code == 1
    verdicts = [line for line in output.splitlines() if line.startswith("doctor:")]
    assert len(verdicts) == 1 and verdicts[0].startswith("doctor: FAIL rank 0"), output[-2000:]
    assert "process group of 2 ranks did not form" in verdicts[0] and "1/2 clients joined" in verdicts[0]
