"""The doctor's verdict from rank reports (no process group needed), and the single-process run."""

from __future__ import annotations

import copy

from dtl import dist
from dtl.tools import doctor
from tests.conftest import main_inproc


def report(rank: int, host: str = "node0", busbw: float = 10.0, **changes) -> dict:
    r = {"rank": rank, "local_rank": rank, "host": host, "torch": "2.5.0", "cuda": "12.4", "nccl": "2.21.5",
         "python": "3.11.9", "dtl": "0.1.0", "interfaces": {"gloo_address": "10.0.0.1"},
         "bandwidth": [{"mb": 1.0, "seconds": 0.01, "busbw": busbw, "algbw": busbw, "correct": True}]}
    r.update(changes)
    return r


def test_a_healthy_world_has_no_problems():
    assert doctor.problems([report(0), report(1), report(2, "node1"), report(3, "node1")]) == []


def test_mismatched_versions_slow_ranks_loopback_and_wrong_sums_are_named():
    reports = [report(0), report(1, torch="2.4.1"), report(2, "node1", busbw=1.0), report(3, "node1")]
    reports[3]["interfaces"] = {"gloo_address": "127.0.1.1"}
    wrong = copy.deepcopy(reports[0])
    wrong["bandwidth"][0]["correct"] = False
    found = doctor.problems([wrong, *reports[1:]])
    assert "torch versions differ: 2.5.0 on ranks 0,2,3; 2.4.1 on ranks 1" in found
    assert any(p.startswith("rank 2 on node1: bus bandwidth 1.00 GB/s, below 50% of the median") for p in found)
    assert any(p.startswith("rank 3 on node1: gloo would bind to 127.0.1.1 (loopback)") for p in found)
    assert "rank 0: all-reduce returned a wrong sum" in found
    assert len(found) == 4


def test_network_env_keeps_the_variables_that_steer_the_network():
    env = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_0", "GLOO_SOCKET_IFNAME": "eth0", "MASTER_PORT": "1",
           "HOME": "/root", "NCCL_IBEXT": "x"}
    assert list(dist.network_env(env)) == ["GLOO_SOCKET_IFNAME", "MASTER_PORT", "NCCL_IB_HCA", "NCCL_SOCKET_IFNAME"]


def test_one_process_prints_a_table_and_ok(capsys):
    assert main_inproc("doctor", "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert "rank local host" in out and "doctor: OK: 1 rank(s) on 1 host(s)" in out
