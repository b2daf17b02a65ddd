"""The check's results: one `Outcome` per step, the table printed at the end (step | result | seconds |
figures) and the JSON report (every figure, the machine, the versions)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

TAIL_LINES = 30
WIDTH = 120


@dataclasses.dataclass
class Outcome:
    """One step's row: PASS, FAIL or SKIP, how long it took, its figures, and why (FAIL and SKIP)."""

    name: str
    result: str = "PASS"
    seconds: float = 0.0
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    reason: str = ""
    summary: str = ""
    """What the table shows instead of every figure (when they are many)."""
    log: str | None = None
    log_tail: list[str] | None = None


def tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    """The last `n` lines of a log as a terminal showed them (a tqdm line holds every state of its bar: the
    last one shown is kept)."""
    text = path.read_bytes().decode(errors="replace") if path.is_file() else ""  # read_text() turns \r into \n
    lines = []
    for line in text.split("\n"):  # not splitlines(), which also splits at the bar's carriage returns
        shown = [part for part in line.split("\r") if part.strip()]
        lines += shown[-1:]
    return lines[-n:]


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def figures_text(out: Outcome) -> str:
    text = out.summary or ", ".join(f"{k}={fmt(v)}" for k, v in out.figures.items())
    if out.reason:
        text = f"{out.reason}" + (f" | {text}" if text else "")
    return text


def format_table(outcomes: list[Outcome]) -> str:
    """step | result | seconds | figures, the figures wrapped at `WIDTH` columns under their own column."""
    indent = " " * 38
    lines = [f"{'step':<20} {'result':<6} {'seconds':>8}  figures", "-" * WIDTH]
    for out in outcomes:
        wrapped = textwrap.wrap(figures_text(out), WIDTH - len(indent), break_on_hyphens=False) or [""]
        lines.append(f"{out.name:<20} {out.result:<6} {out.seconds:>8.1f}  {wrapped[0]}")
        lines += [indent + line for line in wrapped[1:]]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """The machine and the versions the check ran with."""
    import torchvision

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
                            "host": platform.node(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        nccl = torch.cuda.nccl.version()
        info |= {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                 "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                 "cudnn": torch.backends.cudnn.version(),
                 "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)}
    return info


def report(outcomes: list[Outcome], profile: str, seconds: float, budget_s: float, scratch: Path,
           env: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: the verdict (FAIL when a step failed), the failed steps, and every step's row."""
    failed = [o.name for o in outcomes if o.result == "FAIL"]
    return {"result": "FAIL" if failed else "PASS", "failed": failed, "profile": profile, "seconds": seconds,
            "budget_s": budget_s, "scratch_dir": str(scratch), "environment": env,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": [dataclasses.asdict(o) for o in outcomes]}


def write_report(result: dict[str, Any], path: Path, copy_to: Path | None = None) -> None:
    """The JSON report at `path`, and a copy in the folder `copy_to` (when given) as gpu_check.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy_to / "gpu_check.json")
