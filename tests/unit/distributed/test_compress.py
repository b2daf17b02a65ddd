"""dtl.distributed.compress: the bytes each --grad-compress choice sends, and PowerSGD's state carried through DDP's
bucket rebuilds and a resume (in one process: a world of 1 on gloo still runs the whole PowerSGD hook)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dtl.distributed.compress import GradCompression, plan_bucket, step_bytes


def test_powersgd_rank_4_sends_under_a_fiftieth_of_vgg16s_gradient_bytes():
    """What counts is the gradient shapes (VGG16 built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in torchvision.models.vgg16(num_classes=10).parameters()]
    plain = step_bytes(shapes, "none")
    assert plain == 4 * 134_301_514  # fp32 gradients of every parameter (10-class head)
    assert step_bytes(shapes, "bf16") == plain // 2
    psgd = step_bytes(shapes, "powersgd", rank=4)
    assert psgd * 50 <= plain
    assert psgd == 4 * 328_990  # 1/408 of plain DDP's bytes


def test_plan_groups_q_matrices_by_shape_as_the_hook_does():
    slots, p_total, q_total = plan_bucket(["a", "b", "c", "d"], [(64, 32), (8,), (16, 8, 3, 3), (64, 32)], rank=4)
    assert [s.q_offset for s in slots] == [0, None, 2 * 32 * 4, 32 * 4]  # a and d (same shape) first, then c
    assert (p_total, q_total) == (4 * (64 + 64 + 16), 4 * (32 + 32 + 72))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _train(ddp: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 48, generator=g), torch.randint(0, 10, (16,), generator=g)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()


def _ddp(model: nn.Module, compression: GradCompression) -> DDP:
    ddp = DDP(model, bucket_cap_mb=0.01)  # several buckets once DDP rebuilds them after the first step
    compression.register(ddp)
    return ddp


def _resumed(at: int, steps: int, restore: bool) -> nn.Module:
    model, comp = _net(), GradCompression("powersgd", rank=2, start_iter=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(_ddp(model, comp), opt, range(at))
    tensors, meta = comp.state_tensors()
    weights, optim_state = model.state_dict(), opt.state_dict()
    again, comp2 = _net(), GradCompression("powersgd", rank=2, start_iter=2)
    again.load_state_dict(weights)
    opt2 = torch.optim.SGD(again.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(optim_state)
    if restore:
        comp2.load_state(tensors, meta, error_feedback=True)
    _train(_ddp(again, comp2), opt2, range(at, steps))  # a new DDP: one bucket first, then rebuilt ones
    return again


def test_powersgd_resume_continues_the_error_feedback_bitwise(world_of_one):
    model, comp = _net(), GradCompression("powersgd", rank=2, start_iter=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(_ddp(model, comp), opt, range(7))
    sent, steps = comp.take_counts()
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert steps == 7
    assert sent == 2 * step_bytes(shapes, "none") + 5 * step_bytes(shapes, "powersgd", rank=2)
    resumed = _resumed(4, 7, restore=True)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    forgetful = _resumed(4, 7, restore=False)  # the state matters: without it the run goes elsewhere
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), forgetful.parameters()))


def test_bf16_compression_sends_half_and_trains_close_to_fp32(world_of_one):
    plain_model, model, comp = _net(), _net(), GradCompression("bf16")
    for net, hook in ((plain_model, None), (model, comp)):
        ddp = DDP(net) if hook is None else _ddp(net, hook)
        _train(ddp, torch.optim.SGD(net.parameters(), lr=0.1), range(3))
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert comp.take_counts() == (3 * step_bytes(shapes, "none") // 2, 3)
    for a, b in zip(plain_model.parameters(), model.parameters()):
        assert not torch.equal(a, b)  # bf16 rounding changed the update...
        torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-2)  # ...by about bf16's precision


def test_a_non_finite_step_leaves_the_powersgd_state_as_it_was(world_of_one):
    """One overflowed gradient must not poison the error feedback and Q (NaN gradients forever after)."""
    model, comp = _net(), GradCompression("powersgd", rank=2, start_iter=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ddp = _ddp(model, comp)
    _train(ddp, opt, range(5))
    state = comp.psgd
    errors = {i: e.clone() for i, e in state.error_dict.items()}
    qs = {i: q.clone() for i, q in state.q_memory_dict.items()}
    x = torch.randn(16, 48)
    x[0, 0] = float("inf")  # what an fp16 overflow hands the hook
    nn.functional.cross_entropy(ddp(x), torch.zeros(16, dtype=torch.long)).backward()
    assert not all(p.grad.isfinite().all() for p in model.parameters())  # the step GradScaler would skip
    opt.zero_grad()
    assert all(torch.equal(state.error_dict[i], e) for i, e in errors.items())
    assert all(torch.equal(state.q_memory_dict[i], q) for i, q in qs.items())
    nn.functional.cross_entropy(ddp(torch.randn(16, 48)), torch.zeros(16, dtype=torch.long)).backward()
    assert all(p.grad.isfinite().all() for p in model.parameters())
