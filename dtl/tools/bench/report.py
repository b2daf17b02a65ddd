"""`dtl bench`'s results: medians per side and phase, dtl / reference and dtl / strong-loop ratios, the JSON
layout and the table."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import statistics
from pathlib import Path
from typing import Any

import torch

from dtl.config import Config
from dtl.tools.bench.settings import Options

PHASES = ("input", "train_step", "eval_step")
SIDES = ("reference", "strong", "dtl")
#: the JSON key of dtl's ratio to each reference side
RATIO_KEYS = {"reference": "ratio", "strong": "ratio_strong"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1).strip() if found else model
    return f"{model}, {os.cpu_count()} cores"


def meta(cfg: Config, opts: Options, device: torch.device, precision: dict[str, str]) -> dict[str, Any]:
    import torchvision

    b, d, o = cfg.backbone, cfg.data, cfg.optim
    return {"device": str(device), "device_name": device_name(device), "model": b.model, "mode": b.mode,
            "weights": b.weights, "image_size": d.image_size, "batch_size": o.batch_size,
            "precision": precision, "dataset": d.dataset,
            "train_images": d.train_subset, "eval_images": d.eval_subset, "steps": opts.steps,
            "input_steps": opts.input_steps, "warmup": opts.warmup, "repeats": opts.repeats,
            "threads": torch.get_num_threads(), "memory": opts.memory, "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": opts.command}


def side_results(runs: dict[str, list[float]], memory: dict[str, dict[str, float]] | None,
                 flops: dict[str, float] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for phase in runs:  # PHASES, then the extra input phases that ran (dtl.tools.bench.input_phases)
        rate = statistics.median(runs[phase])
        entry: dict[str, Any] = {"images_per_s": rate, "runs": runs[phase]}
        entry.update((memory or {}).get(phase, {}))
        if flops and phase in flops:
            entry["flops_per_image"] = flops[phase]
            entry["tflops"] = flops[phase] * rate / 1e12
        out[phase] = entry
    return out


def ratios(ref: dict[str, dict[str, Any]], ours: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """dtl / a reference side for every scalar both report (images/s, peak memory, TFLOP/s), in the phases both
    ran, plus
    `images_per_s_paired`: the median over rounds of each round's ratio (the two measurements of a round
    ran back to back, so a load change between rounds cancels out)."""
    keys = ("images_per_s", "peak_rss_mib", "peak_cuda_mib", "tflops")
    out = {}
    for phase in (p for p in ours if p in ref):
        out[phase] = {k: ours[phase][k] / ref[phase][k] for k in keys if k in ours[phase] and k in ref[phase]}
        pairs = zip(ours[phase]["runs"], ref[phase]["runs"])
        out[phase]["images_per_s_paired"] = statistics.median(d / r for d, r in pairs)
    return out


def assemble(cfg: Config, opts: Options, device: torch.device, precision: dict[str, str],
             runs: dict[str, dict[str, list[float]]], memory: dict | None,
             flops: dict[str, dict[str, float]] | None, peak_tflops: float | None) -> dict[str, Any]:
    result: dict[str, Any] = {"meta": meta(cfg, opts, device, precision)}
    for side in SIDES:
        result[side] = side_results(runs[side], (memory or {}).get(side), (flops or {}).get(side))
    for side, key in RATIO_KEYS.items():
        result[key] = ratios(result[side], result["dtl"])
    if flops:
        result["meta"]["flops_per_image"] = flops
    if peak_tflops:
        result["meta"]["bf16_matmul_tflops"] = peak_tflops
        for side in ("strong", "dtl"):
            for phase in ("train_step", "eval_step"):
                entry = result[side][phase]
                entry["fraction_of_bf16_matmul"] = entry["tflops"] / peak_tflops
    return result


def _peak_rss(side: dict[str, Any], phase: str) -> str:
    return f"{side[phase]['peak_rss_mib']:.0f}" if "peak_rss_mib" in side.get(phase, {}) else "-"


def format_table(result: dict[str, Any]) -> str:
    m = result["meta"]
    p = m["precision"]
    lines = [f"dtl bench: {m['model']} {m['mode']}, {m['image_size']} px, batch {m['batch_size']}, dtl {p['dtl']} vs "
             f"reference {p['reference']} and strong loop {p['strong']} on {m['device']} ({m['device_name']}, "
             f"{m['threads']} threads); median of {m['repeats']} rounds of at least {m['steps']} steps "
             f"({m['input_steps']} batches for input)",
             f"{'phase':<14}{'reference img/s':>16}{'strong img/s':>14}{'dtl img/s':>12}{'dtl/ref':>9}{'paired':>8}"
             f"{'dtl/strong':>11}{'paired':>8}{'peak RSS ref / strong / dtl':>32}"]
    for phase in result["ratio"]:
        ref, ours, ratio = result["reference"][phase], result["dtl"][phase], result["ratio"][phase]
        strong, vs = result["strong"].get(phase), result["ratio_strong"].get(phase)
        strong_rate = f"{strong['images_per_s']:>14.1f}" if strong else f"{'-':>14}"
        vs_text = f"{vs['images_per_s']:>10.2f}x{vs['images_per_s_paired']:>7.2f}x" if vs else f"{'-':>11}{'-':>8}"
        peaks = " / ".join(_peak_rss(result[side], phase) for side in SIDES)
        mem = f"{peaks:>28} MiB" if "peak_rss_mib" in ours else ""
        lines.append(f"{phase:<14}{ref['images_per_s']:>16.1f}{strong_rate}{ours['images_per_s']:>12.1f}"
                     f"{ratio['images_per_s']:>8.2f}x{ratio['images_per_s_paired']:>7.2f}x{vs_text}{mem}")
    for phase in ("train_step", "eval_step"):
        if "peak_cuda_mib" in result["dtl"][phase]:
            lines.append(f"{phase}: peak CUDA memory " + ", ".join(
                f"{side} {result[side][phase]['peak_cuda_mib']:.0f} MiB" for side in SIDES))
        if "tflops" in result["dtl"][phase]:
            parts = []
            for side in ("dtl", "strong", "reference"):
                e = result[side][phase]
                frac = (f" = {e['fraction_of_bf16_matmul']:.1%} of bf16 matmul" if "fraction_of_bf16_matmul" in e
                        else "")
                parts.append(f"{side} {e['flops_per_image'] / 1e9:.2f} GFLOP/image, {e['tflops']:.3f} TFLOP/s{frac}")
            peak = (f" (bf16 matmul measured: {m['bf16_matmul_tflops']:.0f} TFLOP/s)" if "bf16_matmul_tflops" in m
                    else "")
            lines.append(f"{phase}: " + "; ".join(parts) + peak)
    return "\n".join(lines)
