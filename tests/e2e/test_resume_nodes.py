"""Resuming a two-node job (two torchrun agents on this machine, `tests.e2e.nodes`) whose nodes have output
folders of their own: rank 0 decides where the run continues and, under DDP, the other node receives the
checkpoint from it; where every rank needs its own part of each checkpoint (FSDP shards, PowerSGD), the run stops
before training with one message that says the folder must be shared."""

from __future__ import annotations

import pytest

from tests.conftest import TINY, assert_same_weights, rewind_copy
from tests.e2e.nodes import node_folder, run_nodes

#: 48 images / (2 ranks x 8) = 3 steps per epoch; checkpoints at global steps 2 (mid-epoch 1), 3 (its end),
#: 4 (mid-epoch 2) and 6
FLAGS = [*TINY, "--train-subset", "48", "--eval-subset", "16", "--batch-size", "8", "--epochs", "2",
         "--checkpoint-every-steps", "2", "--keep-last", "20", "--dist-timeout", "60"]


def test_node_local_folders_resume_where_rank_0_decides(tmp_path):
    """Node 1's own folder holds no checkpoint: it still resumes at rank 0's mid-epoch checkpoint (weights,
    momentum, its RNG streams and the position sent by rank 0) and ends bitwise where the uninterrupted run
    ends, instead of starting at step 0 while rank 0 resumes (which hung the job)."""
    full = [node_folder(tmp_path, n) / "full" for n in (0, 1)]
    results = run_nodes(tmp_path, [[*FLAGS, "--output-dir", str(out)] for out in full], timeout=240)
    assert all(r.returncode == 0 for r in results), results[0].log[-3000:] + results[1].log[-3000:]
    assert not full[1].exists()  # only rank 0 writes: node 1's folder never held a checkpoint
    part = [node_folder(tmp_path, n) / "part" for n in (0, 1)]
    rewind_copy(full[0], part[0], 4)  # killed after global step 4: epoch 2, one step in
    results = run_nodes(tmp_path, [[*FLAGS, "--output-dir", str(out), "--resume", "auto"] for out in part],
                        timeout=240)
    assert all(r.returncode == 0 for r in results), results[0].log[-3000:] + results[1].log[-3000:]
    assert "resumed from" in results[0].log and "step-00000004" in results[0].log
    assert "replicas in sync" in results[0].log
    assert_same_weights(full[0], part[0])


@pytest.mark.parametrize("per_rank", [["--strategy", "fsdp"], ["--grad-compress", "powersgd"]],
                         ids=["fsdp", "powersgd"])
def test_per_rank_checkpoints_need_a_shared_folder(tmp_path, per_rank):
    """FSDP shards and PowerSGD's error feedback are written by each rank into the folder rank 0 prepares: with
    node-local folders the run stops before the first step, and says why."""
    outs = [node_folder(tmp_path, n) / "run" for n in (0, 1)]
    results = run_nodes(tmp_path, [[*FLAGS, *per_rank, "--output-dir", str(out)] for out in outs], timeout=120)
    assert all(r.returncode != 0 for r in results)
    message = "rank(s) 1 cannot see"
    assert message in results[0].log and "must be a folder that all nodes share" in results[0].log, results[0].log
    assert not (outs[0] / "checkpoints").exists() and not outs[1].exists()
    assert not any(p.name.startswith(".dtl-shared-") for p in tmp_path.rglob("*"))  # the probe is removed
