"""Transfer mode: the frozen backbone builds no graph and holds no activations (issue 6)."""

import os
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
import torch
from dtl import models
torch.manual_seed(0)
model = models.build_model("vgg11", 10, "none", 64)
models.freeze(model, "vgg11", MODE, None)
if MODE == "transfer":
    models.FrozenPrefix(model, "classifier.6")
x = torch.randn(32, 3, 64, 64)
saved = []
def pack(t):
    saved.append(t.numel() * t.element_size())
    return t
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
def rss(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1])
base = rss("VmRSS:")
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    model(x).sum().backward()
print(rss("VmHWM:") - base, sum(saved))
"""


def peak(mode: str) -> tuple[int, int]:
    """(peak RSS increase in KiB during one step, bytes autograd saved for backward)."""
    out = subprocess.run([sys.executable, "-c", PEAK.replace("MODE", repr(mode))], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    return int(out[0]), int(out[1])


def test_transfer_step_peaks_below_finetune_step():
    (rss_t, saved_t), (rss_f, saved_f) = peak("transfer"), peak("finetune")
    assert saved_t <= 32 * 4096 * 4 * 2  # only the head's input (and its dropout mask) is kept
    assert saved_f > 50 * saved_t
    assert rss_t < rss_f, (rss_t, rss_f)
