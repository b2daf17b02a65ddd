"""The doctor's verdict from rank reports (no process group needed), and the single-process run."""

from __future__ import annotations

import copy
import random

import pytest

from dtl import distributed
from dtl.tools import doctor
from tests.conftest import main_inproc

SIZES = (1.0, 4.0, 16.0)


def report(rank: int, host: str = "node0", seconds: float | list[list[float]] = 0.01, world: int = 4,
           **changes) -> dict:
    """One rank's report as gather_reports returns it: `seconds` is every timed all-reduce's time, or per
    size the list of them."""
    times = seconds if isinstance(seconds, list) else [[seconds] * 20 for _ in SIZES]
    r = {"rank": rank, "local_rank": rank, "world_size": world, "host": host, "device": f"cuda:{rank}",
         "device_name": "NVIDIA H100", "memory_gib": 79.1, "torch": "2.5.0", "cuda": "12.4", "nccl": "2.21.5",
         "python": "3.11.9", "dtl": "0.1.0", "env": {"NCCL_SOCKET_IFNAME": "ib0"},
         "interfaces": {"gloo_address": "10.0.0.1", "gloo": "ib0 10.0.0.1", "nccl": "ib0", "route": "ib0 10.0.0.1"},
         "bandwidth": [{"mb": mb, "iters": len(t), "times": t, "wrong": 0, "correct": True}
                       for mb, t in zip(SIZES, times)]}
    r.update(changes)
    return r


def noisy(rng: random.Random, slow_share: float, iters: int = 20) -> list[list[float]]:
    """Per size, `iters` times around 10 ms, of which about `slow_share` are 3-6x slower (a busy machine)."""
    return [[0.01 * (rng.uniform(3, 6) if rng.random() < slow_share else rng.uniform(0.8, 1.2))
             for _ in range(iters)] for _ in SIZES]


def two_hosts(*times: list[list[float]]) -> list[dict]:
    return [report(i, f"node{i // 2}", t, world=len(times)) for i, t in enumerate(times)]


def test_a_healthy_world_has_no_problems():
    reports = [report(0), report(1), report(2, "node1"), report(3, "node1")]
    assert doctor.problems(reports) == [] and doctor.slow_ranks(reports, doctor.SLOW_FRACTION) == []


def test_mismatched_versions_loopback_and_wrong_sums_are_named():
    reports = [report(0), report(1, torch="2.4.1"), report(2, "node1"), report(3, "node1")]
    reports[3]["interfaces"] = {"gloo_address": "127.0.1.1"}
    wrong = copy.deepcopy(reports[0])
    wrong["bandwidth"][0].update(wrong=1, correct=False)
    found = doctor.problems([wrong, *reports[1:]])
    assert "torch versions differ: 2.5.0 on ranks 0,2,3; 2.4.1 on ranks 1" in found
    assert any(p.startswith("rank 3 on node1: gloo would bind to 127.0.1.1 (loopback)") for p in found)
    assert "rank 0: all-reduce returned a wrong sum" in found
    assert len(found) == 3


def test_a_consistently_slow_rank_is_named_with_the_rule():
    rng = random.Random(0)
    reports = two_hosts(*(noisy(rng, 0.1) for _ in range(3)), noisy(rng, 0.95))
    found = doctor.slow_ranks(reports, doctor.SLOW_FRACTION)
    assert len(found) == 1 and found[0].startswith("rank 3 on node1: bus bandwidth below 50% of the other ranks' "
                                                   "median in "), found
    assert "of its 60 timed all-reduces (at 16 MiB: " in found[0]
    text = doctor.table(reports)
    assert "busbw below 50% of the other ranks' median in >= 75% of its timed all-reduces" in text
    assert "slow rank: judged: 4 ranks on 2 hosts, 20 iterations per size" in text
    counts = doctor.slow_counts(reports, doctor.SLOW_FRACTION)
    assert counts[3][0] >= 0.75 * 60 and all(counts[r][0] < 0.75 * 60 for r in range(3))


def test_noisy_but_healthy_ranks_are_not_named():
    """Every rank slow now and then, one of them in nearly half its all-reduces: a busy machine, not a rank."""
    rng = random.Random(1)
    reports = two_hosts(noisy(rng, 0.2), noisy(rng, 0.3), noisy(rng, 0.45), noisy(rng, 0.2), noisy(rng, 0.3))
    assert doctor.slow_ranks(reports, doctor.SLOW_FRACTION) == []


def test_a_rank_slow_in_one_size_only_is_not_named():
    fast, slow = [0.01] * 20, [0.05] * 20
    reports = two_hosts(*([fast, fast, fast] for _ in range(3)), [slow, fast, fast])
    assert doctor.slow_counts(reports, doctor.SLOW_FRACTION)[3] == (20, 60)
    assert doctor.slow_ranks(reports, doctor.SLOW_FRACTION) == []


def test_a_lower_slow_fraction_needs_a_larger_margin():
    reports = two_hosts(*([[0.01] * 20] * 3 for _ in range(3)), [[0.03] * 20] * 3)
    assert len(doctor.slow_ranks(reports, 0.5)) == 1
    assert doctor.slow_ranks(reports, 0.25) == [] and doctor.slow_ranks(reports, 0.0) == []


@pytest.mark.parametrize(("hosts", "ranks", "iters", "why"), [
    (1, 4, 20, "one host"), (2, 2, 20, "2 ranks"), (2, 4, 1, "1 timed all-reduce(s) per size")])
def test_where_timings_cannot_single_out_a_rank_nothing_is_named(hosts, ranks, iters, why):
    """One host, fewer than 3 ranks, or too few iterations (the SLURM test's --iters 1): the rank
    that took 5x longer is not a finding, and the table says why."""
    times = [[[0.01] * iters] * 3 for _ in range(ranks - 1)] + [[[0.05] * iters] * 3]
    reports = [report(i, f"node{i * hosts // ranks}", t, world=ranks) for i, t in enumerate(times)]
    assert doctor.slow_ranks(reports, doctor.SLOW_FRACTION) == []
    assert f"slow rank: not judged here: {why}" in doctor.table(reports)


def test_the_world_figure_is_the_slowest_rank_per_iteration_median_over_iterations():
    """Rank 1 took 40 ms in iteration 0 only: the collective's time is 10 ms (the median of 40, 10, 10)."""
    reports = [report(0, seconds=[[0.01] * 3] * 3, world=2), report(1, seconds=[[0.04, 0.01, 0.01]] * 3, world=2)]
    rows = doctor.table(reports).split("size MiB")[1].splitlines()[1:4]
    assert [row.split()[:3] for row in rows] == [["1", "3", "10.00"], ["4", "3", "10.00"], ["16", "3", "10.00"]]


def test_network_env_keeps_the_variables_that_steer_the_network():
    env = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_0", "GLOO_SOCKET_IFNAME": "eth0", "MASTER_PORT": "1",
           "HOME": "/root", "NCCL_IBEXT": "x"}
    assert list(distributed.network_env(env)) == ["GLOO_SOCKET_IFNAME", "MASTER_PORT", "NCCL_IB_HCA",
                                                  "NCCL_SOCKET_IFNAME"]


def test_one_process_prints_a_table_and_ok(capsys):
    assert main_inproc("doctor", "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert "rank local host" in out and "doctor: OK: 1 rank(s) on 1 host(s)" in out


@pytest.mark.parametrize("flag", [["--slow-fraction", "1.5"], ["--slow-fraction", "x"], ["--iters", "0"],
                                  ["--slow-ranks", "maybe"]])
def test_bad_thresholds_are_refused(flag, capsys):
    assert main_inproc("doctor", "--device", "cpu", *flag) == 2
    assert "doctor: OK" not in capsys.readouterr().out
