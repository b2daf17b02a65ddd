"""`dtl bench`'s peak memory: each side in a fresh subprocess (so one side's tensors never count for the
other), its phases run in `PROBE_ORDER` with the peaks reset before each (``/proc/self/clear_refs``), so each
phase's number is the peak RSS (and on a GPU ``torch.cuda.max_memory_allocated``) of a process holding only
that side while it runs that phase."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dtl.config import Config
from dtl.distributed import DistEnv, pick_device
from dtl.tools.bench.report import SIDES
from dtl.tools.bench.settings import Options
from dtl.tools.bench.timing import BenchLoop, synchronize

#: The memory probe's phase order: lightest first, so memory a phase leaves behind never exceeds the next's.
PROBE_ORDER = ("input", "eval_step", "train_step")


def reset_peak_memory(device: torch.device) -> bool:
    """Reset the process's peak RSS (Linux: write 5 to /proc/self/clear_refs) and the CUDA peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak RSS (MiB) since the last reset; on a GPU also the peak of allocated device memory (MiB)."""
    out: dict[str, float] = {}
    try:
        status = Path("/proc/self/status").read_text()
        out["peak_rss_mib"] = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        import resource

        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def probe(spec: dict[str, Any], build: Callable[[str, Config, torch.device], BenchLoop]
          ) -> dict[str, dict[str, float]]:
    """In a fresh process: build one side (with `build`), run each phase after resetting the peaks, read the
    peaks."""
    torch.set_num_threads(spec["threads"])
    cfg = Config.from_dict(spec["config"])
    device = pick_device(DistEnv(), cfg.dist.device)
    loop = build(spec["side"], cfg, device)
    out = {}
    for phase in PROBE_ORDER:
        if not reset_peak_memory(device):
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): use --memory off")
        with loop.context():
            getattr(loop, phase)(spec["steps"])
        synchronize(device)
        out[phase] = peak_memory(device)
    return out


def measure_memory(cfg: Config, opts: Options, tmp: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Peak memory per side and phase, each side in its own fresh `python -m dtl.cli bench --probe` process.
    On a CPU the two run at the same time (peaks are per process, and nothing is timed there); on a GPU one
    after the other, with this process's cached blocks released first, so each probe has the GPU to itself."""
    sequential = cfg.dist.device != "cpu" and torch.cuda.is_available()
    if sequential:
        torch.cuda.empty_cache()
    procs = {}
    for side in SIDES:
        spec_path = tmp / f"probe-{side}.json"
        spec = {"config": cfg.to_dict(), "side": side, "steps": max(opts.warmup, 1) + 1,
                "threads": torch.get_num_threads(), "out": str(tmp / f"probe-{side}.out.json")}
        spec_path.write_text(json.dumps(spec))
        with open(tmp / f"probe-{side}.log", "w") as log_file:
            procs[side] = subprocess.Popen([sys.executable, "-m", "dtl.cli", "bench", "--probe", str(spec_path)],
                                           stdout=log_file, stderr=subprocess.STDOUT)
        if sequential:
            procs[side].wait()
    print(f"  memory: {' and '.join(SIDES)}, each in a subprocess", file=sys.stderr, flush=True)
    result = {}
    for side, proc in procs.items():
        code, out_path = proc.wait(), tmp / f"probe-{side}.out.json"
        if code != 0 or not out_path.is_file():
            log_tail = (tmp / f"probe-{side}.log").read_text()[-3000:]
            raise RuntimeError(f"memory probe for {side} failed (exit {code}):\n{log_tail}")
        result[side] = json.loads(out_path.read_text())
    return result
