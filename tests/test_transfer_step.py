"""Transfer mode: the frozen backbone builds no graph and holds no activations (issue 6)."""

import resource
import subprocess
import sys

import torch

from dtl import models


def test_no_graph_reaches_frozen_parameters():
    model = models.build_model("vgg11", 10, "none", 32)
    models.freeze(model, "vgg11", "transfer", None)
    models.FrozenPrefix(model, "classifier.6")
    seen = []
    model.classifier[5].register_forward_hook(lambda m, a, out: seen.append(out))
    out = model(torch.randn(2, 3, 32, 32))
    assert seen[0].grad_fn is None and not seen[0].requires_grad  # the head's input: no graph behind it
    assert out.grad_fn is not None and torch.is_grad_enabled()  # the head itself does build one
    out.sum().backward()
    frozen = [p for n, p in model.named_parameters() if not n.startswith("classifier.6")]
    assert all(p.grad is None for p in frozen)
    assert model.classifier[6].weight.grad is not None


PEAK = """
import resource, torch
from dtl import models
torch.manual_seed(0)
model = models.build_model("vgg11", 10, "none", 64)
models.freeze(model, "vgg11", sys_mode, None)
if sys_mode == "transfer":
    models.FrozenPrefix(model, "classifier.6")
x = torch.randn(32, 3, 64, 64)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model(x).sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def peak_kib(mode: str) -> int:
    code = PEAK.replace("sys_mode", repr(mode))
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_transfer_step_peaks_below_finetune_step():
    transfer, finetune = peak_kib("transfer"), peak_kib("finetune")
    assert transfer < finetune, (transfer, finetune)
    assert resource  # imported for the subprocess snippet's sake
