"""`dtl doctor`: a preflight every rank of a job runs before training (`torchrun ... -m dtl.cli doctor`, or
`DTL_PREFLIGHT=1` in the SLURM templates).

Each rank describes itself (host, rank, device and memory, torch/CUDA/NCCL versions, the network interfaces
gloo and NCCL would use, the variables that steer them), then all ranks run a timed all-reduce of growing
sizes on the training backend (NCCL on GPUs, gloo on CPUs) and a barrier that names the ranks that miss it.
Rank 0 prints one table and a verdict: versions that differ, a rank that did not join, a bandwidth far below
the others, gloo bound to a loopback address across hosts. Bandwidth as nccl-tests reports it: algbw =
bytes / time, busbw = algbw x 2(n-1)/n for all-reduce. Exit 0 when nothing is wrong, 1 otherwise.
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
from dtl import dist
from dtl.dist import DistEnv

log = logging.getLogger("dtl")
EXAMPLE = "torchrun --standalone --nproc_per_node=4 -m dtl.cli doctor      (or: DTL_PREFLIGHT=1 sbatch slurm/...)"
VERSION_KEYS = ("torch", "cuda", "nccl", "python", "dtl")
SLOW_FRACTION = 0.5
"""A rank whose bus bandwidth is below this fraction of the median is reported."""
REPORT_BYTES = 8192


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "doctor", help="preflight for clusters: each rank's devices/versions/network, a timed all-reduce, a verdict",
        description=__doc__.split("\n\n")[0].replace("\n", " "), epilog=f"example:\n  {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda:LOCAL_RANK when CUDA is available, else CPU (gloo)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long forming the process group, a collective or the barrier may take (default 60)")
    p.add_argument("--sizes-mb", default=None, metavar="LIST",
                   help="all-reduce sizes in MiB, comma-separated (default: 1,4,16,64,256 on GPUs, 1,4,16 on CPUs)")
    p.add_argument("--iters", type=int, default=5, help="timed all-reduces per size, after one warm-up (default 5)")
    return p


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
    net = dist.network_env()
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

def time_all_reduce(env: DistEnv, device: torch.device, sizes_mb: list[float], iters: int) -> list[dict[str, float]]:
    """Per size: this rank's mean seconds per all-reduce, algbw and busbw (GB/s, 1e9 bytes), and whether the
    sum came out right."""
    n = env.world_size
    rows = []
    for mb in sizes_mb:
        numel = max(1, int(mb * 2**20) // 4)
        x = torch.ones(numel, dtype=torch.float32, device=device)
        dist.all_reduce_sum(x, env)  # warm-up (NCCL builds its rings here)
        correct = bool((x == n).all())
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce_sum(x, env)
        _sync(device)
        seconds = (time.perf_counter() - t0) / iters
        algbw = numel * 4 / seconds / 1e9
        rows.append({"mb": mb, "seconds": seconds, "algbw": algbw, "busbw": algbw * 2 * (n - 1) / n,
                     "correct": correct})
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather_reports(report: dict[str, Any], env: DistEnv, device: torch.device) -> list[dict[str, Any]]:
    """Every rank's report on every rank (JSON in a fixed-size byte tensor: no pickling)."""
    raw = json.dumps(report).encode()[:REPORT_BYTES]
    buf = torch.zeros(REPORT_BYTES, dtype=torch.uint8)
    buf[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return [json.loads(bytes(t.cpu().tolist()).rstrip(b"\0")) for t in dist.all_gather_tensor(buf.to(device), env)]


# ---- the verdict --------------------------------------------------------------------------------------

def problems(reports: list[dict[str, Any]]) -> list[str]:
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
    bw = [r["bandwidth"][-1]["busbw"] for r in reports if r.get("bandwidth")]
    median = statistics.median(bw) if bw else 0.0
    for r in reports:
        rows = r.get("bandwidth") or []
        if rows and not all(row["correct"] for row in rows):
            found.append(f"rank {r['rank']}: all-reduce returned a wrong sum")
        if len(reports) > 1 and rows and rows[-1]["busbw"] < SLOW_FRACTION * median:
            found.append(f"rank {r['rank']} on {r['host']}: bus bandwidth {rows[-1]['busbw']:.2f} GB/s, below "
                         f"{SLOW_FRACTION:.0%} of the median {median:.2f} GB/s")
    return found


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks)) if len(ranks) < 6 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"


def table(reports: list[dict[str, Any]]) -> str:
    head = f"{'rank':>4} {'local':>5} {'host':<16} {'device':<8} {'name':<24} {'GiB':>6} {'torch':<14} " \
           f"{'cuda':<6} {'nccl':<8} {'gloo iface':<30} busbw GB/s"
    lines = [head]
    for r in reports:
        bw = f"{r['bandwidth'][-1]['busbw']:.2f}" if r.get("bandwidth") else "-"
        lines.append(f"{r['rank']:>4} {r['local_rank']:>5} {r['host'][:16]:<16} {r['device']:<8} "
                     f"{str(r['device_name'])[:24]:<24} {r['memory_gib'] or '-':>6} {r['torch']:<14} "
                     f"{r['cuda'] or '-':<6} {r['nccl'] or '-':<8} {r['interfaces']['gloo'][:30]:<30} {bw}")
    if reports[0].get("bandwidth"):
        lines += ["", f"{'size MiB':>9} {'time ms':>9} {'algbw GB/s':>11} {'busbw GB/s':>11}   (slowest rank)"]
    for i, row in enumerate(reports[0].get("bandwidth") or []):
        t = max(r["bandwidth"][i]["seconds"] for r in reports)
        algbw = row["mb"] * 2**20 / t / 1e9
        n = len(reports)
        lines.append(f"{row['mb']:>9g} {t * 1e3:>9.2f} {algbw:>11.2f} {algbw * 2 * (n - 1) / n:>11.2f}")
    r0 = reports[0]
    lines.append("")
    lines.append(f"rank 0: nccl iface {r0['interfaces']['nccl']}; route to MASTER_ADDR {r0['interfaces']['route']}")
    lines.append("network env (rank 0): " + (" ".join(f"{k}={v}" for k, v in r0["env"].items()) or "none set"))
    return "\n".join(lines)


# ---- the command --------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """Every rank: describe, form the group (bounded by --timeout), measure, barrier; rank 0: table + verdict."""
    env = dist.detect()
    dist.setup_logging(env)
    device = dist.pick_device(env, args.device)
    sizes = [float(s) for s in (args.sizes_mb or ("1,4,16,64,256" if device.type == "cuda" else "1,4,16")).split(",")]
    report = local_report(env, device)
    where = f"{env.master_addr}:{env.master_port}" if env.master_addr else "the launcher's rendezvous"
    t0 = time.perf_counter()
    try:
        dist.setup(env, device, args.timeout)
    except Exception as err:  # noqa: BLE001 - any failure to form the group is the verdict
        print(f"doctor: FAIL rank {env.rank} on {report['host']}: the process group of {env.world_size} ranks did "
              f"not form within {time.perf_counter() - t0:.0f} s at {where} ({_first_line(err)}): a rank that "
              "never started, or one that cannot reach MASTER_ADDR:MASTER_PORT (firewall, wrong interface: "
              "GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME)", flush=True)
        return 1
    try:
        report["bandwidth"] = time_all_reduce(env, device, sizes, args.iters) if env.distributed else []
        reports = gather_reports(report, env, device)
        dist.monitored_barrier(env, args.timeout)
    except Exception as err:  # noqa: BLE001 - a rank that died or hangs after joining
        print(f"doctor: FAIL rank {env.rank}: a collective failed or timed out after {args.timeout:.0f} s "
              f"({_first_line(err)})", flush=True)
        return 1
    if not env.is_main:
        return 0
    found = problems(reports)
    print(table(reports), flush=True)
    hosts = len({r["host"] for r in reports})
    if found:
        print(f"doctor: FAIL ({env.world_size} ranks on {hosts} host(s)):\n  - " + "\n  - ".join(found), flush=True)
        return 1
    print(f"doctor: OK: {env.world_size} rank(s) on {hosts} host(s) joined, same versions, all-reduce correct",
          flush=True)
    return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"
