"""Launch detection and sharding, without starting processes (the real launches are in test_launchers.py)."""

import pytest
import torch

from dtl import dist
from dtl.data import EvalShardSampler, train_sampler
from dtl.errors import UserError


def test_plain_python_is_one_process():
    env = dist.detect(environ={})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "python")


def test_torchrun_and_accelerate_environments():
    base = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    env = dist.detect(environ=base)
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (3, 1, 4, "torchrun")
    env = dist.detect(environ={**base, "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert env.launcher == "accelerate" and env.accelerate_mixed_precision == "bf16"


def test_debug_forces_one_process_under_a_launcher():
    env = dist.detect(debug=True, environ={"RANK": "1", "WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "debug")


def test_srun_environment():
    env = dist.detect(environ={"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
                               "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "4242",
                               "SLURM_STEP_TASKS_PER_NODE": "4(x2)"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (5, 1, 8, 4)
    assert env.launcher == "srun" and env.master_port == 20000 + 4242
    assert env.master_addr in ("gpu003",)


def test_sbatch_script_without_srun_is_one_process():
    # The batch script itself has SLURM_NTASKS but no step: running python there must not wait for peers.
    env = dist.detect(environ={"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})
    assert env.world_size == 1


@pytest.mark.parametrize("nodelist,first", [("node7", "node7"), ("gpu[003-005,007],cpu1", "gpu003"),
                                            ("a[10,12]", "a10"), ("x-1,y", "x-1")])
def test_first_slurm_host_parser(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # our parser, not scontrol
    assert dist.first_slurm_host(nodelist) == first


def test_bad_rank_variable_is_a_user_error():
    with pytest.raises(UserError, match="RANK"):
        dist.detect(environ={"RANK": "zero", "WORLD_SIZE": "2"})


def test_a_world_smaller_than_promised_is_refused(monkeypatch):
    # e.g. a runtime that silently stays single-process under a multi-process launcher
    monkeypatch.setattr(dist.tdist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(dist.tdist, "get_world_size", lambda: 1)
    monkeypatch.setattr(dist.tdist, "get_rank", lambda: 0)
    with pytest.raises(RuntimeError, match="refusing to train undistributed"):
        dist.setup(dist.DistEnv(rank=0, world_size=2, launcher="accelerate"), torch.device("cpu"), 10)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_training_shards_are_disjoint_cover_and_reshuffle(world):
    n = 50
    shards = {}
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            sampler = train_sampler(n, dist.DistEnv(rank=rank, world_size=world), seed=0)
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
