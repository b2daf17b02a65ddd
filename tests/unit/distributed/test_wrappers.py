"""dtl.distributed.wrappers: what a training model wears (DDP, torch.compile) and the way back to the model."""

from __future__ import annotations

import torch
from torch import nn
from torch._dynamo.utils import counters

from dtl.distributed import DistEnv, unwrap, wrap


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).to(memory_format=torch.channels_last)


def test_compile_keeps_static_shapes_through_a_partial_last_batch():
    """The GPU check's compile_recompiles step, on the CPU's inductor: channels_last convolutions trained on full
    batches and a partial last batch, two epochs. One graph per batch size (one recompile, then none), gradients
    that match eager and keep the weights' channels_last layout."""
    torch._dynamo.reset()
    counters.clear()
    eager = _conv_net()
    model = wrap(_conv_net(), DistEnv(), torch.device("cpu"), compile_model=True)
    assert unwrap(model) is not model
    for batch in (8, 8, 5) * 2:
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch)).contiguous(
            memory_format=torch.channels_last)
        y = torch.arange(batch) % 4
        for net in (model, eager):
            nn.functional.cross_entropy(net(x), y).backward()
        for ours, ref in zip(unwrap(model).parameters(), eager.parameters()):
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-5)
            assert ours.grad.stride() == ours.stride()
            ours.grad, ref.grad = None, None
    assert counters["stats"]["unique_graphs"] == 2  # batch 8 and batch 5: static, no dynamic-shape recompile
