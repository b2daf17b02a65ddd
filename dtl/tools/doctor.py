"""`dtl doctor`: a preflight every rank of a job runs before training (`torchrun ... -m dtl.cli doctor`, or
`DTL_PREFLIGHT=1` in the SLURM templates).

Each rank describes itself (host, rank, device and memory, torch/CUDA/NCCL versions, the network interfaces
gloo and NCCL would use, the variables that steer them), then all ranks run a timed all-reduce of growing
sizes on the training backend (NCCL on GPUs, gloo on CPUs) and a barrier that names the ranks that miss it.
Rank 0 prints one table and a verdict: versions that differ, a rank that did not join, a wrong sum, a rank
that is consistently slow, gloo bound to a loopback address across hosts. Exit 0 when nothing is wrong, 1
otherwise.

Bandwidth as nccl-tests reports it: algbw = bytes / time, busbw = algbw x 2(n-1)/n for all-reduce; per size
the median over `--iters` timed all-reduces (each after a barrier) of the slowest rank's time, since an
all-reduce is done when its last rank is. A rank's own time is compared with the other ranks' in the same
all-reduce; it is reported only when slow in most of them by a clear margin, only across hosts (on one host
the ranks share CPUs and memory, and timings differ by load), and the table prints the rule it applied.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import platform
import socket
import statistics
import struct
import time
from typing import Any

import torch

import dtl
from dtl import distributed
from dtl.config import DEVICES
from dtl.distributed import DistEnv, ProcessGroups

log = logging.getLogger("dtl")
EXAMPLE = "torchrun --standalone --nproc_per_node=4 -m dtl.cli doctor      (or: DTL_PREFLIGHT=1 sbatch slurm/...)"
VERSION_KEYS = ("torch", "cuda", "nccl", "python", "dtl")
SLOW_FRACTION = 0.5
"""Default --slow-fraction: in one timed all-reduce, a rank is slow when its bus bandwidth is below this fraction
of the other ranks' median (its time above twice their median time)."""
SLOW_SHARE = 0.75
"""A rank is reported only when it is slow in at least this share of its timed all-reduces, all sizes together."""
MIN_RANKS = 3
MIN_ITERS = 5
"""Fewer ranks, or fewer timed all-reduces per size, give no median and no share worth a verdict."""
WARMUP_ITERS = 2
REPORT_BYTES = 8192


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "doctor", help="preflight for clusters: each rank's devices/versions/network, a timed all-reduce, a verdict",
        description=__doc__.split("\n\n")[0].replace("\n", " "), epilog=f"example:\n  {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: cuda:LOCAL_RANK when CUDA is available, else CPU (gloo)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long forming the process group, a collective or the barrier may take (default 60)")
    p.add_argument("--sizes-mb", default=None, metavar="LIST",
                   help="all-reduce sizes in MiB, comma-separated (default: 1,4,16,64,256 on GPUs, 1,4,16 on CPUs)")
    p.add_argument("--iters", type=_positive_int, default=20,
                   help=f"timed all-reduces per size, each after a barrier, after {WARMUP_ITERS} warm-ups (default 20; "
                   f"a slow rank is judged from {MIN_ITERS} up)")
    p.add_argument("--slow-fraction", type=_fraction, default=SLOW_FRACTION, metavar="F",
                   help=f"a rank is slow in an all-reduce when its bus bandwidth is below F x the other ranks' "
                   f"median; it is reported when slow in {SLOW_SHARE:.0%}% of them (default {SLOW_FRACTION}; 0: never)")
    p.add_argument("--slow-ranks", choices=("fail", "warn"), default="fail",
                   help="fail: a consistently slow rank fails the verdict (exit 1); warn: it is printed as a "
                   "warning and the verdict stays OK (default fail)")
    return p


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


# ---- what one rank knows about itself ------------------------------------------------------------------

def _iface_addresses() -> dict[str, str]:
    """Interface name -> IPv4 address (Linux ioctl; empty where unavailable)."""
    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
                out[name] = socket.inet_ntoa(packed[20:24])
            except OSError:
                continue
    return out


def _route_address(host: str) -> str | None:
    """The local address the kernel would use to reach `host` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def interfaces(net: dict[str, str]) -> dict[str, str]:
    """Which interface gloo and NCCL would use, and the route to MASTER_ADDR, as `name (address)`."""
    addrs = _iface_addresses()
    name_of = {a: n for n, a in addrs.items()}

    def describe(address: str | None) -> str:
        return f"{name_of.get(address or '', '?')} {address}" if address else "?"

    try:
        host_ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        host_ip = None
    gloo = net.get("GLOO_SOCKET_IFNAME")
    nccl = net.get("NCCL_SOCKET_IFNAME")
    usable = [n for n in addrs if not n.startswith(("lo", "docker", "virbr", "ifb"))]
    return {"gloo": f"{gloo} {addrs.get(gloo, '?')} (GLOO_SOCKET_IFNAME)" if gloo else f"{describe(host_ip)} hostname",
            "nccl": f"{nccl} (NCCL_SOCKET_IFNAME)" if nccl else f"NCCL's own choice, likely {(usable or ['lo'])[0]}",
            "route": describe(_route_address(net["MASTER_ADDR"])) if net.get("MASTER_ADDR") else "-",
            "gloo_address": gloo and addrs.get(gloo, "") or host_ip or ""}


def local_report(env: DistEnv, device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    net = distributed.network_env()
    return {"rank": env.rank, "local_rank": env.local_rank, "world_size": env.world_size,
            "host": socket.gethostname(), "device": str(device),
            "device_name": props.name if props else platform.processor() or platform.machine(),
            "memory_gib": round(props.total_memory / 2**30, 1) if props else None,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": _nccl_version() if cuda else None,
            "python": platform.python_version(), "dtl": dtl.__version__,
            "interfaces": interfaces(net), "env": net}


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()  # a tuple in recent torch, an int (2.18.1 -> 21801) in older ones
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


# ---- measurements ------------------------------------------------------------------------------------

def time_all_reduce(groups: ProcessGroups, device: torch.device, sizes_mb: list[float],
                    iters: int) -> list[dict[str, Any]]:
    """Per size: this rank's seconds for each timed all-reduce (`times`), their median with its algbw and
    busbw (GB/s, 1e9 bytes), and how many results had a wrong sum (`wrong`).

    Every timed all-reduce starts right after a barrier: otherwise a rank's time mostly says how long it
    waited for the last rank to arrive (every rank of a collective waits for the slowest), not how fast the
    all-reduce was. The tensor is refilled with ones outside the timed part, so every sum can be checked."""
    n = groups.env.world_size
    rows = []
    for mb in sizes_mb:
        numel = max(1, int(mb * 2**20) // 4)
        x = torch.ones(numel, dtype=torch.float32, device=device)
        for _ in range(WARMUP_ITERS):  # NCCL builds its rings and gloo its buffers here
            groups.all_reduce_sum(x.fill_(1.0))
        wrong = int(not bool((x == n).all()))
        times = []
        for _ in range(iters):
            x.fill_(1.0)
            _sync(device)
            groups.barrier()
            _sync(device)
            t0 = time.perf_counter()
            groups.all_reduce_sum(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
            wrong += int(not bool((x == n).all()))
        seconds = statistics.median(times)
        algbw = numel * 4 / seconds / 1e9
        rows.append({"mb": mb, "iters": iters, "times": times, "seconds": seconds, "algbw": algbw,
                     "busbw": _busbw(algbw, n), "wrong": wrong, "correct": wrong == 0})
    return rows


def _busbw(algbw: float, n: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce: what each link carries, comparable across world sizes."""
    return algbw * 2 * (n - 1) / n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather_reports(report: dict[str, Any], groups: ProcessGroups, device: torch.device) -> list[dict[str, Any]]:
    """Every rank's report on every rank (JSON in a fixed-size byte tensor: no pickling). The per-iteration
    times travel as a tensor of their own, so that many iterations never overflow the JSON's bytes."""
    rows = report.get("bandwidth") or []
    times = torch.tensor([row["times"] for row in rows], dtype=torch.float64)
    brief = {**report, "bandwidth": [{k: v for k, v in row.items() if k != "times"} for row in rows]}
    raw = json.dumps(brief).encode()[:REPORT_BYTES]
    buf = torch.zeros(REPORT_BYTES, dtype=torch.uint8)
    buf[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    gathered = groups.all_gather(buf.to(device))
    reports = [json.loads(bytes(t.cpu().tolist()).rstrip(b"\0")) for t in gathered]
    if rows:
        for r, t in zip(reports, groups.all_gather(times.to(device))):
            for row, seconds in zip(r["bandwidth"], t.cpu().tolist()):
                row["times"] = seconds
    return reports


# ---- the verdict --------------------------------------------------------------------------------------

def problems(reports: list[dict[str, Any]]) -> list[str]:
    """What is wrong whatever the timings: versions that differ, gloo on loopback across hosts, wrong sums.
    Slow ranks are `slow_ranks`' business."""
    found = []
    for key in VERSION_KEYS:
        seen: dict[str, list[int]] = {}
        for r in reports:
            seen.setdefault(str(r[key]), []).append(r["rank"])
        if len(seen) > 1:
            found.append(f"{key} versions differ: " + "; ".join(f"{v} on ranks {_ranks(rs)}" for v, rs in seen.items()))
    if len({r["host"] for r in reports}) > 1:
        for r in reports:
            if r["interfaces"]["gloo_address"].startswith("127."):
                found.append(f"rank {r['rank']} on {r['host']}: gloo would bind to {r['interfaces']['gloo_address']}"
                             " (loopback) across hosts: set GLOO_SOCKET_IFNAME (README: Several nodes)")
    for r in reports:
        rows = r.get("bandwidth") or []
        if rows and not all(row["correct"] for row in rows):
            found.append(f"rank {r['rank']}: all-reduce returned a wrong sum")
    return found


def not_judged(reports: list[dict[str, Any]]) -> str | None:
    """Why the ranks' all-reduce times cannot single out a slow rank here, or None when they can."""
    if not all(r.get("bandwidth") for r in reports):
        return "no all-reduce was timed"
    if len({r["host"] for r in reports}) < 2:
        return "one host (its ranks share CPUs, memory and links: their times differ by load, not by a rank's link)"
    if len(reports) < MIN_RANKS:
        return f"{len(reports)} ranks (a median of fewer than {MIN_RANKS} has no majority to stand out from)"
    iters = min(row["iters"] for r in reports for row in r["bandwidth"])
    if iters < MIN_ITERS:
        return f"{iters} timed all-reduce(s) per size (--iters; at least {MIN_ITERS} needed)"
    return None


def slow_counts(reports: list[dict[str, Any]], fraction: float) -> dict[int, tuple[int, int]]:
    """Rank -> (its slow timed all-reduces, its timed all-reduces), over all sizes. Slow: the rank's bus
    bandwidth below `fraction` x the median of the other ranks' in the same all-reduce, i.e. its time above
    their median time / `fraction`. Comparing within one all-reduce cancels what every rank saw (a busy
    network, a hiccup of the machine); leaving the rank out of its own median keeps one other noisy rank
    from hiding it in a small world."""
    counts = {r["rank"]: [0, 0] for r in reports}
    for k, row in enumerate(reports[0]["bandwidth"]):
        for i in range(len(row["times"])):
            times = [r["bandwidth"][k]["times"][i] for r in reports]
            for j, r in enumerate(reports):
                others = statistics.median(times[:j] + times[j + 1:])
                counts[r["rank"]][0] += times[j] * fraction > others
                counts[r["rank"]][1] += 1
    return {rank: (slow, total) for rank, (slow, total) in counts.items()}


def slow_ranks(reports: list[dict[str, Any]], fraction: float) -> list[str]:
    """The ranks that are consistently slow: slow (see `slow_counts`) in at least SLOW_SHARE of their timed
    all-reduces, where `not_judged` finds the comparison meaningful. One noisy iteration, or a rank that is
    slow in some sizes only, is not a finding."""
    if not_judged(reports) is not None:
        return []
    found = []
    counts = slow_counts(reports, fraction)
    medians = [_rank_busbw(r) for r in reports]
    world = statistics.median(medians)
    for r, busbw in zip(reports, medians):
        slow, total = counts[r["rank"]]
        if slow >= SLOW_SHARE * total:
            found.append(f"rank {r['rank']} on {r['host']}: bus bandwidth below {fraction:.0%} of the other ranks' "
                         f"median in {slow} of its {total} timed all-reduces (at {r['bandwidth'][-1]['mb']:g} MiB: "
                         f"{busbw:.2f} GB/s, the ranks' median {world:.2f} GB/s)")
    return found


def _rank_busbw(report: dict[str, Any]) -> float:
    """A rank's busbw at the largest size, from the median of its times there."""
    row = report["bandwidth"][-1]
    return _busbw(row["mb"] * 2**20 / statistics.median(row["times"]) / 1e9, report["world_size"])


def rule(reports: list[dict[str, Any]], fraction: float, action: str) -> str:
    """The slow-rank rule with its thresholds, and whether it applied here and why not (two lines)."""
    why = not_judged(reports)
    iters = min(row["iters"] for r in reports for row in r["bandwidth"])
    where = f"not judged here: {why}" if why else \
        f"judged: {len(reports)} ranks on {len({r['host'] for r in reports})} hosts, {iters} iterations per size"
    return (f"slow rank (--slow-fraction {fraction:g}, --slow-ranks {action}): busbw below {fraction:.0%} of the "
            f"other ranks' median in >= {SLOW_SHARE:.0%} of its timed all-reduces; judged across hosts, with "
            f"{MIN_RANKS}+ ranks and {MIN_ITERS}+ iterations per size\nslow rank: {where}")


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks)) if len(ranks) < 6 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"


def table(reports: list[dict[str, Any]], fraction: float = SLOW_FRACTION, action: str = "fail") -> str:
    judged = reports[0].get("bandwidth") and not_judged(reports) is None
    counts = slow_counts(reports, fraction) if judged else {}
    head = f"{'rank':>4} {'local':>5} {'host':<16} {'device':<8} {'name':<24} {'GiB':>6} {'torch':<14} " \
           f"{'cuda':<6} {'nccl':<8} {'gloo iface':<30} busbw GB/s  slow"
    lines = [head]
    for r in reports:
        bw = f"{_rank_busbw(r):.2f}" if r.get("bandwidth") else "-"
        slow = "{}/{}".format(*counts[r["rank"]]) if judged else "-"
        lines.append(f"{r['rank']:>4} {r['local_rank']:>5} {r['host'][:16]:<16} {r['device']:<8} "
                     f"{str(r['device_name'])[:24]:<24} {r['memory_gib'] or '-':>6} {r['torch']:<14} "
                     f"{r['cuda'] or '-':<6} {r['nccl'] or '-':<8} {r['interfaces']['gloo'][:30]:<30} {bw:>10}  {slow}")
    if reports[0].get("bandwidth"):
        lines += ["", f"{'size MiB':>9} {'iters':>5} {'time ms':>9} {'algbw GB/s':>11} {'busbw GB/s':>11} "
                  f"{'#wrong':>6}   (an all-reduce's time: its slowest rank's; median over iterations)"]
    n = len(reports)
    for k, row in enumerate(reports[0].get("bandwidth") or []):
        t = statistics.median(max(per_rank) for per_rank in zip(*(r["bandwidth"][k]["times"] for r in reports)))
        algbw = row["mb"] * 2**20 / t / 1e9
        wrong = sum(r["bandwidth"][k]["wrong"] for r in reports)
        lines.append(f"{row['mb']:>9g} {row['iters']:>5} {t * 1e3:>9.2f} {algbw:>11.2f} {_busbw(algbw, n):>11.2f} "
                     f"{wrong:>6}")
    if reports[0].get("bandwidth"):
        lines.append(rule(reports, fraction, action))
    r0 = reports[0]
    lines.append("")
    lines.append(f"rank 0: nccl iface {r0['interfaces']['nccl']}; route to MASTER_ADDR {r0['interfaces']['route']}")
    lines.append("network env (rank 0): " + (" ".join(f"{k}={v}" for k, v in r0["env"].items()) or "none set"))
    return "\n".join(lines)


# ---- the command --------------------------------------------------------------------------------------

def run(args: argparse.Namespace, env: DistEnv) -> int:
    """Every rank: describe, form the group (bounded by --timeout), measure, barrier; rank 0: table + verdict."""
    device = distributed.pick_device(env, args.device)
    sizes = [float(s) for s in (args.sizes_mb or ("1,4,16,64,256" if device.type == "cuda" else "1,4,16")).split(",")]
    report = local_report(env, device)
    where = f"{env.master_addr}:{env.master_port}" if env.master_addr else "the launcher's rendezvous"
    t0 = time.perf_counter()
    try:
        groups = distributed.setup(env, device, args.timeout)
    except Exception as err:  # noqa: BLE001 - any failure to form the group is the verdict
        print(f"doctor: FAIL rank {env.rank} on {report['host']}: the process group of {env.world_size} ranks did "
              f"not form within {time.perf_counter() - t0:.0f} s at {where} ({_first_line(err)}): a rank that "
              "never started, or one that cannot reach MASTER_ADDR:MASTER_PORT (firewall, wrong interface: "
              "GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME)", flush=True)
        return 1
    try:
        report["bandwidth"] = time_all_reduce(groups, device, sizes, args.iters) if env.distributed else []
        reports = gather_reports(report, groups, device)
        groups.monitored_barrier(args.timeout)
    except Exception as err:  # noqa: BLE001 - a rank that died or hangs after joining
        print(f"doctor: FAIL rank {env.rank}: a collective failed or timed out after {args.timeout:.0f} s "
              f"({_first_line(err)})", flush=True)
        return 1
    if not env.is_main:
        return 0
    slow = slow_ranks(reports, args.slow_fraction)
    found = problems(reports) + (slow if args.slow_ranks == "fail" else [])
    print(table(reports, args.slow_fraction, args.slow_ranks), flush=True)
    hosts = len({r["host"] for r in reports})
    for warning in [] if args.slow_ranks == "fail" else slow:
        print(f"doctor: warning: {warning}", flush=True)
    if found:
        print(f"doctor: FAIL ({env.world_size} ranks on {hosts} host(s)):\n  - " + "\n  - ".join(found), flush=True)
        return 1
    print(f"doctor: OK: {env.world_size} rank(s) on {hosts} host(s) joined, same versions, all-reduce correct",
          flush=True)
    return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"
