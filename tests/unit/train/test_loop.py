"""dtl.train.loop: the replica check and mid-epoch resume with MixUp/CutMix and the batched chain, bitwise.
The sync point's abort is tested with the step (test_step.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dtl import distributed
from dtl.train import loop
from dtl.train.trained_model import TrainedModel
from tests.conftest import TINY, assert_same_weights, rewind_copy, train_inproc


def test_replica_check_sums_per_parameter_without_a_full_float64_copy():
    # the checksum of the whole flattened model equals the per-parameter accumulation
    net = nn.Sequential(nn.Linear(300, 200), nn.Linear(200, 7))
    flat = torch.cat([p.detach().double().flatten() for p in net.parameters()])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64) % 9973
    expected = torch.stack([flat.sum(), (flat * weights).sum()])
    seen = {}

    class TwoRanks:  # the collective check_replicas calls, without a process group
        env = distributed.DistEnv(world_size=2)

        def all_gather(self, t):
            seen["t"] = t
            return [t, t]

    class FakeParts:
        groups = TwoRanks()
        env = groups.env
        model = TrainedModel(net, distributed.DistEnv(), torch.device("cpu"), compile_model=False)

    loop.check_replicas(FakeParts())  # type: ignore[arg-type]
    torch.testing.assert_close(seen["t"], expected, rtol=1e-12, atol=1e-9)


MIX = [*TINY, "--model", "resnet18", "--train-subset", "48", "--eval-subset", "16", "--batch-size", "8",
       "--grad-accum", "2", "--seed", "7", "--mixup", "0.2", "--cutmix", "1.0", "--checkpoint-every-steps", "1",
       "--keep-last", "20"]


#: every augmentation at once: the batched chain (TA wide, random erasing) and the mixing together
ALL_AUG = ["--auto-augment", "ta_wide", "--random-erasing", "0.25"]


@pytest.mark.parametrize("extra", [[], ALL_AUG], ids=["mix", "mix+ta_wide+erasing"])
def test_resume_mid_epoch_with_mixup_and_cutmix_is_bitwise(tmp_path, extra):
    """3 optimizer steps (6 micro-batches) per epoch: resuming from step 2 (batch 4 of epoch 1) draws the
    same mixes without replaying the first four (and, with the chain on, replays the loader's draws)."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_inproc(*MIX, *extra, "--epochs", "2", "--output-dir", str(full)) == 0
    rewind_copy(full, part, 2)
    assert train_inproc(*MIX, *extra, "--epochs", "2", "--output-dir", str(part), "--resume", "auto") == 0
    assert_same_weights(full, part)
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (full, part)]
    assert rows[0][-1]["train_loss"] == rows[1][-1]["train_loss"]
