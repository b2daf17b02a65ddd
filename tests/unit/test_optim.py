"""dtl.optim."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtl import checkpoint as ckpt
from dtl import optim


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
    ckpt.write_tensors(tmp_path / "optim.safetensors", tensors)
    model_state = {k: v.clone() for k, v in net.state_dict().items()}
    state = ckpt.optimizer_from_tensors(ckpt.read_tensors(tmp_path / "optim.safetensors"), extra)

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
