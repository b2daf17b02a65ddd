"""Launch detection and sharding, without starting processes (the real launches are in test_launchers.py)."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from dtl import distributed
from dtl.data.samplers import EvalShardSampler, train_sampler
from dtl.distributed import group
from dtl.errors import UserError
from tests.conftest import free_port


def test_plain_python_is_one_process():
    env = distributed.detect(environ={})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "python")


def test_torchrun_and_accelerate_environments():
    base = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    env = distributed.detect(environ=base)
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (3, 1, 4, "torchrun")
    env = distributed.detect(environ={**base, "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert env.launcher == "accelerate" and env.accelerate_mixed_precision == "bf16"


def test_debug_forces_one_process_under_a_launcher():
    env = distributed.detect(debug=True, environ={"RANK": "1", "WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "debug")


def test_srun_environment():
    env = distributed.detect(environ={"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
                               "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "4242",
                               "SLURM_STEP_TASKS_PER_NODE": "4(x2)"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (5, 1, 8, 4)
    assert env.launcher == "srun" and env.master_port == 20000 + 4242
    assert env.master_addr in ("gpu003",)


def test_sbatch_script_without_srun_is_one_process():
    # The batch script itself has SLURM_NTASKS but no step: running python there must not wait for peers.
    env = distributed.detect(environ={"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})
    assert env.world_size == 1


@pytest.mark.parametrize("nodelist,first", [("node7", "node7"), ("gpu[003-005,007],cpu1", "gpu003"),
                                            ("a[10,12]", "a10"), ("x-1,y", "x-1")])
def test_first_slurm_host_parser(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # our parser, not scontrol
    assert distributed.first_slurm_host(nodelist) == first


def test_bad_rank_variable_is_a_user_error():
    with pytest.raises(UserError, match="RANK"):
        distributed.detect(environ={"RANK": "zero", "WORLD_SIZE": "2"})


def test_a_world_smaller_than_promised_is_refused(monkeypatch):
    # e.g. a runtime that silently stays single-process under a multi-process launcher
    monkeypatch.setattr(group.dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(group.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(group.dist, "get_rank", lambda: 0)
    with pytest.raises(RuntimeError, match="refusing to train undistributed"):
        distributed.setup(distributed.DistEnv(rank=0, world_size=2, launcher="accelerate"), torch.device("cpu"), 10)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_training_shards_are_disjoint_cover_and_reshuffle(world):
    n = 50
    shards = {}
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            sampler = train_sampler(n, distributed.DistEnv(rank=rank, world_size=world), seed=0)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
        flat = [i for shard in per_rank for i in shard]
        assert set(flat) == set(range(n))
        padding = len(flat) - n  # DistributedSampler pads the *training* set up to a multiple of world
        assert padding < world and len(set(flat)) == n
        if padding == 0:
            assert all(set(a).isdisjoint(b) for i, a in enumerate(per_rank) for b in per_rank[i + 1:])
        shards[epoch] = per_rank
    assert shards[0] != shards[1]


@pytest.mark.parametrize("world", [1, 2, 3, 6, 7])
def test_eval_shards_count_every_image_once(world):
    n = 1003
    flat = [i for r in range(world) for i in EvalShardSampler(n, r, world)]
    assert sorted(flat) == list(range(n))


@pytest.mark.parametrize("local_rank, local_world, visible, per_task, expected", [
    (0, 4, 4, None, 0), (3, 4, 4, None, 3),      # one process per GPU, all GPUs visible
    (3, 4, 1, None, 0), (2, 4, 1, 1, 0),         # --gpus-per-task=1 / --gpu-bind: each task sees one
    (3, 4, 2, 2, 1), (2, 4, 2, 2, 0),            # each task bound to its own pair
])
def test_gpu_index(local_rank, local_world, visible, per_task, expected):
    env = distributed.DistEnv(local_rank=local_rank, local_world_size=local_world, world_size=local_world,
                       gpus_per_task=per_task)
    assert distributed.gpu_index(env, visible) == expected


def test_gpu_index_refuses_two_processes_on_one_gpu():
    env = distributed.DistEnv(local_rank=3, local_world_size=4, world_size=4)
    with pytest.raises(UserError, match="local rank 3 has no GPU of its own: this process sees 2 GPU"):
        distributed.gpu_index(env, 2)


def test_slurm_gpus_per_task_and_forced_group_are_read():
    env = distributed.detect(environ={"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "2",
                               "SLURM_JOB_ID": "7", "SLURM_GPUS_PER_TASK": "1", "MASTER_ADDR": "h"})
    assert env.gpus_per_task == 1 and env.master_port == 20007
    forced = distributed.detect(environ={"RANK": "0", "WORLD_SIZE": "1", "DTL_FORCE_DISTRIBUTED": "1"})
    assert forced.distributed and forced.world_size == 1
    assert not distributed.detect(environ={"RANK": "0", "WORLD_SIZE": "1"}).distributed


def _two_ranks(rank: int, port: int, out: str, job: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    env = distributed.DistEnv(rank=rank, local_rank=rank, world_size=2, local_world_size=2, launcher="torchrun")
    # "order": rank 0's I/O outlasts --dist-timeout (2 s here), as a large image cache's first decode does
    groups = distributed.setup(env, torch.device("cpu"), timeout_s=2 if job == "order" else 20)
    result: dict = {}
    try:
        if job == "agreement":
            agreement = distributed.Agreement(groups)
            for step in range(8):
                flag = rank == 1 and step >= 3  # rank 1 alone sees the signal, from step 3 on
                if agreement.step(flag, False)[0]:
                    result["stopped_at"] = step
                    break
            agreement.drain()
        elif job == "order":
            marker = Path(out) / "first"

            def work(first: bool) -> bool:
                if rank == 0:
                    import time

                    time.sleep(4.0)  # slow rank-0 I/O: the other must wait for it, not race it nor time out
                    marker.write_text("0")
                return marker.exists()

            result["saw_rank0_result"] = groups.main_first(work)
        elif job == "failure":
            def fail(first: bool) -> None:
                if rank == 0:
                    raise UserError("no data here")

            try:
                groups.main_first(fail, timeout_s=20)
            except UserError as err:
                result["error"] = str(err)
    finally:
        distributed.teardown()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def _spawn(job: str, tmp_path: Path) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(free_port(), str(tmp_path), job), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_agreement_stops_every_rank_at_the_same_step(tmp_path):
    results = _spawn("agreement", tmp_path)
    assert results[0]["stopped_at"] == results[1]["stopped_at"] == 4  # raised at 3, agreed one step later


def test_main_first_runs_rank0_before_the_others(tmp_path):
    results = _spawn("order", tmp_path)
    assert results[1]["saw_rank0_result"] is True


def test_main_first_failure_stops_every_rank_without_a_hang(tmp_path):
    results = _spawn("failure", tmp_path)
    assert results[0]["error"] == "no data here"
    assert "another rank failed" in results[1]["error"]


def test_control_group_gets_the_dist_timeout(monkeypatch):
    seen = []
    monkeypatch.setattr(group.dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(group.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(group.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(group.dist, "new_group", lambda **k: seen.append(k) or f"group {len(seen)}")
    groups = distributed.setup(distributed.DistEnv(world_size=2, launcher="torchrun"), torch.device("cpu"), 42)
    control, io = seen
    assert control["backend"] == "gloo" and control["timeout"].total_seconds() == 42
    # the rank-0 I/O waits (main_first, wait_for_main) get their own, longer gloo timeout
    assert io["backend"] == "gloo" and io["timeout"].total_seconds() == group.MAIN_IO_TIMEOUT_S
    assert (groups.control, groups.control_timeout_s, groups.io, groups.io_timeout_s) == (
        "group 1", 42, "group 2", group.MAIN_IO_TIMEOUT_S)


def test_one_process_collectives_do_nothing(monkeypatch):
    """Plain runs: `setup` creates no group, and the collectives of what it returns leave torch.distributed
    alone (any call into it would fail here)."""
    for name in ("init_process_group", "new_group", "barrier", "all_reduce", "all_gather", "broadcast"):
        monkeypatch.setattr(group.dist, name, lambda *a, **k: pytest.fail("a collective in one process"))
    groups = distributed.setup(distributed.DistEnv(), torch.device("cpu"), 42)
    assert groups == distributed.ProcessGroups(control_timeout_s=42) and not groups.distributed
    t = torch.ones(3)
    assert groups.all_reduce_sum(t) is t and groups.all_gather(t) == [t]
    assert groups.broadcast_str("runs/x", torch.device("cpu")) == "runs/x"
    assert groups.main_first(lambda first: first) is True
    groups.barrier()
    groups.wait_for_main()
    assert distributed.Agreement(groups).step(True, False) == [True, False]  # at once: nobody to wait for


def test_unwrap_helpers_see_through_compile():
    net = nn.Linear(2, 2)
    compiled = torch.compile(net, backend="eager")
    assert distributed.local_module(compiled) is net and distributed.unwrap(compiled) is net
    assert distributed.ddp_of(compiled) is None


def test_exit_after_a_failure_leaves_the_group_alone(monkeypatch):
    torn = []
    monkeypatch.setattr(group, "teardown", lambda: torn.append(1))
    monkeypatch.setattr(group.os, "_exit", lambda code: torn.append(f"exit {code}"))
    env = distributed.DistEnv(world_size=2)
    distributed.exit_process(1, env)
    assert torn == ["exit 1"]
    distributed.exit_process(0, env)
    assert torn == ["exit 1", 1, "exit 0"]
