"""dtl.train.optimisation.ema: the average against a reference computed from the raw weights' history; resume
keeps it exact; model_ema.safetensors is a torchvision state dict."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from dtl.train.optimisation.ema import Ema, EmaView
from tests.conftest import TINY, assert_same_weights, rewind_copy, train_inproc


def test_matches_a_reference_average_of_the_weights_history():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    net[0].requires_grad_(False)  # frozen parameters are not averaged (they never change)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    ema = Ema(net, decay=0.95, every=2)
    tracked = dict(zip(ema.names, [t.clone() for t in ema.sources]))
    assert "0.weight" not in tracked and "1.running_mean" in tracked and "1.num_batches_tracked" not in tracked
    reference = {k: v.clone().double() for k, v in tracked.items()}
    live = dict(net.named_parameters()) | dict(net.named_buffers())
    for step in range(12):
        net(torch.randn(8, 5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(step)
        if (step + 1) % 2 == 0:
            d = min(0.95, (1 + step) / (10 + step))
            for k in reference:
                reference[k] = d * reference[k] + (1 - d) * live[k].detach().double()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v.double(), reference[k], atol=1e-6, rtol=0)
    x = torch.randn(4, 5)
    net.eval()
    view = EmaView(net, ema)
    averaged = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).eval()
    averaged.load_state_dict(ema.full_state(net))
    torch.testing.assert_close(view(x), averaged(x))


EMA = [*TINY, "--model", "resnet18", "--train-subset", "48", "--eval-subset", "16", "--batch-size", "8",
       "--seed", "5", "--ema-decay", "0.9", "--checkpoint-every-steps", "2", "--keep-last", "20"]


def test_resume_mid_epoch_is_bitwise_for_weights_and_ema(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_inproc(*EMA, "--epochs", "2", "--output-dir", str(full)) == 0
    rewind_copy(full, part, 4)  # keep the checkpoint of step 4 of 6 (mid-epoch 1)
    assert train_inproc(*EMA, "--epochs", "2", "--output-dir", str(part), "--resume", "auto") == 0
    assert_same_weights(full, part, "model.safetensors", "model_ema.safetensors")
    ema, raw = load_file(str(full / "model_ema.safetensors")), load_file(str(full / "model.safetensors"))
    assert not torch.equal(ema["fc.weight"], raw["fc.weight"])  # it is an average, not a copy
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(ema, strict=True)


def test_ema_is_evaluated_and_can_pick_the_best(tmp_path):
    import json

    out = tmp_path / "run"
    assert train_inproc(*EMA, "--epochs", "1", "--best-of", "ema", "--output-dir", str(out)) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= row["test_acc_ema"] <= 1 and row["test_loss_ema"] > 0
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["source"] == "ema" and best["test_acc"] == pytest.approx(row["test_acc_ema"])
