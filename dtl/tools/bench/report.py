"""`dtl bench`'s results: medians per side and phase, dtl / reference ratios, the JSON layout and the table."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import re
import statistics
from pathlib import Path
from typing import Any

import torch

from dtl.config import Config

PHASES = ("input", "train_step", "eval_step")
SIDES = ("reference", "dtl")


@dataclasses.dataclass
class Options:
    """The bench's own settings (the model/data/device ones are a `Config`)."""

    steps: int = 5
    warmup: int = 2
    repeats: int = 3
    memory: str = "subprocess"
    flops: bool | None = None
    threads: int | None = None
    json_path: str | None = None
    command: str = ""
    input_steps: int = 50

    def steps_for(self, phase: str) -> int:
        return self.input_steps if phase.startswith("input") else self.steps


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1).strip() if found else model
    return f"{model}, {os.cpu_count()} cores"


def meta(cfg: Config, opts: Options, device: torch.device, precision: str) -> dict[str, Any]:
    import torchvision

    b, d, o = cfg.backbone, cfg.data, cfg.optim
    return {"device": str(device), "device_name": device_name(device), "model": b.model, "mode": b.mode,
            "weights": b.weights, "image_size": d.image_size, "batch_size": o.batch_size,
            "precision": {"reference": "fp32", "dtl": precision}, "dataset": d.dataset,
            "train_images": d.train_subset, "eval_images": d.eval_subset, "steps": opts.steps,
            "input_steps": opts.input_steps, "warmup": opts.warmup, "repeats": opts.repeats,
            "threads": torch.get_num_threads(), "memory": opts.memory, "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": opts.command}


def side_results(runs: dict[str, list[float]], memory: dict[str, dict[str, float]] | None,
                 flops: dict[str, float] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for phase in runs:  # PHASES, then the extra input phases that ran (dtl.bench_input)
        rate = statistics.median(runs[phase])
        entry: dict[str, Any] = {"images_per_s": rate, "runs": runs[phase]}
        entry.update((memory or {}).get(phase, {}))
        if flops and phase in flops:
            entry["flops_per_image"] = flops[phase]
            entry["tflops"] = flops[phase] * rate / 1e12
        out[phase] = entry
    return out


def ratios(ref: dict[str, dict[str, Any]], ours: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """dtl / reference for every scalar both sides report (images/s, peak memory, TFLOP/s), plus
    `images_per_s_paired`: the median over rounds of each round's ratio (the two measurements of a round
    ran back to back, so a load change between rounds cancels out)."""
    keys = ("images_per_s", "peak_rss_mib", "peak_cuda_mib", "tflops")
    out = {}
    for phase in ours:
        out[phase] = {k: ours[phase][k] / ref[phase][k] for k in keys if k in ours[phase] and k in ref[phase]}
        pairs = zip(ours[phase]["runs"], ref[phase]["runs"])
        out[phase]["images_per_s_paired"] = statistics.median(d / r for d, r in pairs)
    return out


def assemble(cfg: Config, opts: Options, device: torch.device, precision: str,
             runs: dict[str, dict[str, list[float]]], memory: dict | None,
             flops: dict[str, dict[str, float]] | None, peak_tflops: float | None) -> dict[str, Any]:
    result: dict[str, Any] = {"meta": meta(cfg, opts, device, precision)}
    for side in SIDES:
        result[side] = side_results(runs[side], (memory or {}).get(side), (flops or {}).get(side))
    result["ratio"] = ratios(result["reference"], result["dtl"])
    if flops:
        result["meta"]["flops_per_image"] = flops
    if peak_tflops:
        result["meta"]["bf16_matmul_tflops"] = peak_tflops
        for phase in ("train_step", "eval_step"):
            result["dtl"][phase]["fraction_of_bf16_matmul"] = result["dtl"][phase]["tflops"] / peak_tflops
    return result


def format_table(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"dtl bench: {m['model']} {m['mode']}, {m['image_size']} px, batch {m['batch_size']}, dtl "
             f"{m['precision']['dtl']} vs reference fp32 on {m['device']} ({m['device_name']}, "
             f"{m['threads']} threads); median of {m['repeats']} rounds of {m['steps']} steps "
             f"({m['input_steps']} batches for input)",
             f"{'phase':<14}{'reference img/s':>16}{'dtl img/s':>12}{'dtl/ref':>9}{'paired':>8}"
             f"{'ref peak RSS':>14}{'dtl peak RSS':>14}{'dtl/ref':>9}"]
    for phase in result["ratio"]:
        ref, ours, ratio = result["reference"][phase], result["dtl"][phase], result["ratio"][phase]
        mem = (f"{ref['peak_rss_mib']:>10.0f} MiB{ours['peak_rss_mib']:>10.0f} MiB"
               f"{ratio['peak_rss_mib']:>8.2f}x" if "peak_rss_mib" in ratio else "")
        lines.append(f"{phase:<14}{ref['images_per_s']:>16.1f}{ours['images_per_s']:>12.1f}"
                     f"{ratio['images_per_s']:>8.2f}x{ratio['images_per_s_paired']:>7.2f}x{mem}")
    for phase in ("train_step", "eval_step"):
        ours = result["dtl"][phase]
        if "peak_cuda_mib" in ours:
            lines.append(f"{phase}: peak CUDA memory reference {result['reference'][phase]['peak_cuda_mib']:.0f} "
                         f"MiB, dtl {ours['peak_cuda_mib']:.0f} MiB")
        if "tflops" in ours:
            frac = (f" = {ours['fraction_of_bf16_matmul']:.1%} of bf16 matmul "
                    f"({result['meta']['bf16_matmul_tflops']:.0f} TFLOP/s)" if "fraction_of_bf16_matmul" in ours
                    else "")
            ref = result["reference"][phase]
            lines.append(f"{phase}: dtl {ours['flops_per_image'] / 1e9:.2f} GFLOP/image, {ours['tflops']:.3f} "
                         f"TFLOP/s{frac}; reference {ref['flops_per_image'] / 1e9:.2f} GFLOP/image, "
                         f"{ref['tflops']:.3f} TFLOP/s")
    return "\n".join(lines)
