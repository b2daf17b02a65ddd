"""dtl.train.optimisation.optimizer: parameter groups, kernels under a GradScaler, and restored state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dtl import atomic_files, models
from dtl.config import Config
from dtl.train import step
from dtl.train.checkpoint import format as ckpt
from dtl.train.optimisation import optimizer as optim
from dtl.train.optimisation.lr import lr_at
from tests.conftest import TINY, train_inproc


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    net(torch.zeros(1, 3, 8, 8))
    return net.to(memory_format=torch.channels_last)


def _step(net: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(4, 3, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    loss = net(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_resume_with_channels_last_and_fused_optimizer_is_bitwise(kind, tmp_path):
    def make(net: nn.Module) -> torch.optim.Optimizer:
        if kind == "sgd":
            return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=True)
        return torch.optim.AdamW(net.parameters(), lr=0.01, fused=True)

    ref = _conv_net()
    ref_opt = make(ref)
    for i in range(6):
        _step(ref, ref_opt, i)

    net = _conv_net()
    opt = make(net)
    for i in range(3):
        _step(net, opt, i)
    # through the checkpoint format: tensors are written contiguous (NCHW)
    tensors, extra = ckpt.optimizer_to_tensors(opt.state_dict())
    atomic_files.write_tensors(tmp_path / "optim.safetensors", tensors)
    model_state = {k: v.clone() for k, v in net.state_dict().items()}
    state = ckpt.optimizer_from_tensors(atomic_files.read_tensors(tmp_path / "optim.safetensors"), extra)

    resumed = _conv_net()
    resumed.load_state_dict(model_state)
    resumed_opt = make(resumed)
    optim.load_optimizer_state(resumed_opt, state)
    for p in resumed.parameters():
        for value in resumed_opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert value.stride() == p.stride()
    for i in range(3, 6):
        _step(resumed, resumed_opt, i)
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_optimizer_resumes_with_channels_last(kind):
    net = _conv_net().cuda()
    make = (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, fused=True)) if kind == "sgd" else (
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, fused=True))
    opt = make(net)
    x = torch.randn(4, 3, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    net(x).square().mean().backward()
    opt.step()
    tensors, extra = ckpt.optimizer_to_tensors(opt.state_dict())
    state = ckpt.optimizer_from_tensors({k: v.cpu().contiguous() for k, v in tensors.items()}, extra)
    resumed_opt = make(net)
    optim.load_optimizer_state(resumed_opt, state)
    net(x).square().mean().backward()
    resumed_opt.step()  # raised "strides do not match" before the fix
    torch.cuda.synchronize()


# ---- parameter groups ----------------------------------------------------------------------------------

def _table(name: str, **settings) -> tuple[list[dict], list]:
    net = models.skeleton(name)
    models.replace_head(net, 10)
    models.freeze(net, name, "finetune", None)
    return optim.param_groups(net, name, Config(**settings).optim)


@pytest.mark.parametrize("name, first_blocks", [
    ("vgg16", ["classifier.3", "classifier.0", "features.28"]),          # fc7, fc6, the last conv
    ("resnet18", ["layer4.1", "layer4.0", "layer3.1"]),
    ("vit_b_16", ["encoder.ln", "encoder.layers.encoder_layer_11", "encoder.layers.encoder_layer_10"]),
])
def test_layer_decay_table_has_the_blocks_in_order_with_powers_of_d(name, first_blocks):
    d = 0.8
    _, rows = _table(name, layer_decay=d, head_lr_mult=10.0, weight_decay=0.05)
    mult = {r.block: r.lr_mult for r in rows}
    order = list(dict.fromkeys(r.block for r in reversed(rows)))  # head first, then downwards to the stem
    assert order[0] == "head" and order[1:4] == first_blocks
    assert mult["head"] == 10.0
    for depth, block in enumerate(order[1:], start=1):
        assert mult[block] == pytest.approx(d ** depth), block


def test_biases_and_norms_get_no_weight_decay_unless_asked():
    net = models.skeleton("resnet18")
    groups, rows = optim.param_groups(net, "resnet18", Config(weight_decay=0.05).optim)
    by_decay = {g["weight_decay"]: g["params"] for g in groups}
    assert all(p.ndim == 1 for p in by_decay[0.0]) and all(p.ndim > 1 for p in by_decay[0.05])
    groups, _ = optim.param_groups(net, "resnet18", Config(weight_decay=0.05, wd_norm_bias=True).optim)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05
    groups, _ = optim.param_groups(net, "resnet18", Config().optim)  # every feature off: one group
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(net.parameters()))


def test_head_group_learns_at_m_times_the_scheduled_rate(tmp_path, monkeypatch):
    flags = [*TINY, "--model", "resnet18", "--train-subset", "64", "--eval-subset", "16", "--batch-size", "8",
             "--epochs", "2", "--lr-schedule", "cosine", "--warmup-epochs", "0.5", "--head-lr-mult", "10",
             "--layer-decay", "0.5"]
    seen = []
    original = step.optimizer_step

    def spy(parts, state, bad_step, losses):
        original(parts, state, bad_step, losses)
        expected = lr_at(parts.cfg.optim, state.global_step, parts.steps_per_epoch, 1)
        head = next(g for g in parts.optimizer.param_groups if g["lr_mult"] == 10.0)
        seen.append((head["lr"], 10.0 * expected))

    monkeypatch.setattr(step, "optimizer_step", spy)
    assert train_inproc(*flags, "--output-dir", str(tmp_path / "run")) == 0
    assert len(seen) == 16 and len({round(b, 12) for _, b in seen}) > 3  # warm-up and cosine: it moves
    assert all(a == pytest.approx(b, rel=1e-12) for a, b in seen)


def _overflow_then_step(opt: torch.optim.Optimizer, net: nn.Module) -> torch.amp.GradScaler:
    """One step whose scaled gradients overflow (the scaler skips it), then one ordinary step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scaler.scale(net(x).sum() * 1e35).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    scaler.scale(net(x).square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    return scaler


def test_sgd_under_an_fp16_grad_scaler_survives_an_overflowed_first_step():
    """The GPU check's fp16_overflow step: torch's fused SGD, handed found_inf by the scaler, leaves uninitialised
    momentum buffers after a skipped first step. dtl's optimizer for a scaled CUDA run must step exactly like
    plain SGD that never saw the skipped step (the fused CPU kernel has the same flaw, so this runs here)."""
    cfg = Config(model="squeezenet1_1", mode="scratch", momentum=0.9, weight_decay=0.0)
    net = models.build_model("squeezenet1_1", 3, "none", 32, dropout=0.0)
    reference = copy.deepcopy(net)
    plain = torch.optim.SGD(reference.parameters(), lr=cfg.optim.lr, momentum=0.9, foreach=False)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference(x).square().mean().backward()
    plain.step()

    opt, _ = optim.build_optimizer(cfg.optim, net, "squeezenet1_1", torch.device("cuda"), grad_scaler=True)
    assert _overflow_then_step(opt, net).get_scale() < 2.0**16  # the first step did overflow
    for ours, theirs in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    # without a scaler the CUDA fast path stays fused
    fast, _ = optim.build_optimizer(cfg.optim, net, "squeezenet1_1", torch.device("cuda"))
    assert fast.defaults["fused"] is True
