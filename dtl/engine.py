"""The training engine: `train(cfg, env, device)` is the one code path every launcher runs.

Order of a run: validate everything that can be wrong (output folder, data, weights, checkpoint) before
anything is written; then epochs of train + eval; checkpoints at epoch ends, every N steps/minutes, and on a
stop signal; final weights and curves at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from dtl import checkpoint as ckpt
from dtl import data as dtl_data
from dtl import features, models, rundir, signals
from dtl.config import Config
from dtl.dist import (
    Agreement,
    DistEnv,
    all_gather_tensor,
    barrier,
    ddp_of,
    local_module,
    main_first,
    unwrap,
    wait_for_main,
)
from dtl.errors import EXIT_OK, EXIT_PREEMPTED, NonFiniteLossError, UserError
from dtl.metrics import Meter, append_metrics, plot_runs

log = logging.getLogger("dtl")


@dataclass
class Progress:
    """The counters a checkpoint restores."""

    epoch: int = 0
    """Completed epochs."""
    step_in_epoch: int = 0
    """Optimizer steps already done in the current (incomplete) epoch."""
    global_step: int = 0
    best_acc: float = -1.0
    nan_skips: int = 0
    """Non-finite steps skipped in a row (--nan-policy skip)."""
    nan_skips_total: int = 0
    overflow_skips: int = 0
    """fp16: optimizer steps the GradScaler skipped because the scaled gradients overflowed (not errors)."""
    partial_meter: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Train loss/correct/count sums of the incomplete epoch, over all ranks."""
    partial_seconds: float = 0.0


@dataclass
class Run:
    """Everything one training run holds, so functions take one argument instead of eighteen."""

    cfg: Config
    env: DistEnv
    device: torch.device
    outdir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: str
    train_loader: Any
    eval_loader: Any
    classes: list[str]
    progress: Progress
    info: dict[str, Any]
    last_ckpt_time: float = field(default_factory=time.monotonic)
    tb: Any = None
    new_features: dict = field(default_factory=dict)
    """Features computed by this run (--cache-features), written to OUTDIR/features once the folder exists."""
    splits: Any = None
    """The data splits (`dtl.data.Splits`); an image folder's split is saved to OUTDIR/split.json."""
    overflows: torch.Tensor | None = None
    """fp16: overflow-skipped steps since the last sync point, counted on the device (no host sync per step)."""

    @property
    def accum(self) -> int:
        return self.cfg.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_loader) / self.accum)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.precision, self.device)

    def __post_init__(self) -> None:
        if self.overflows is None:
            self.overflows = torch.zeros((), dtype=torch.int64, device=self.device)


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ---- setup -------------------------------------------------------------------------------------

def resolve_precision(cfg: Config, env: DistEnv, device: torch.device) -> tuple[str, str]:
    """(precision, why). Flag > accelerate's explicit choice > bf16 on GPUs that have bf16 in hardware
    (Ampere and newer) / fp16 + GradScaler on older ones / fp32 on CPU. `accelerate launch` exports
    ACCELERATE_MIXED_PRECISION=no whenever neither its config nor its flag chose, so "no" is not taken as a
    choice: pass --precision fp32 for fp32 on a GPU."""
    if cfg.precision != "auto":
        return cfg.precision, "--precision flag"
    mp = env.accelerate_mixed_precision
    if mp in ("bf16", "fp16"):
        return mp, f"accelerate config ({mp})"
    if device.type == "cuda":
        note = (" (accelerate exports mixed_precision=no whenever nothing chose: not a choice; "
                "--precision fp32 forces fp32)") if mp == "no" else ""
        return ("bf16" if bf16_in_hardware() else "fp16"), "GPU default" + note
    if mp == "no":
        return "fp32", "accelerate config (no)"
    return "fp32", "CPU default (bf16 autocast is slower on CPUs)"


def bf16_in_hardware() -> bool:
    """bf16 without emulation: `is_bf16_supported()` alone also says yes on V100/T4, where bf16 is emulated
    (and slow)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no such argument and counted no emulation
        return torch.cuda.is_bf16_supported()


def configure_backends(cfg: Config, device: torch.device, precision: str) -> None:
    """Kernel choices that follow from the run's settings (process-wide, so set once here)."""
    if cfg.deterministic:
        # warn_only=False: an op without a deterministic kernel stops the run naming the op (dist.run_guarded
        # turns it into one message), instead of a warning nobody reads and a run that is not reproducible.
        torch.use_deterministic_algorithms(True, warn_only=False)
    if device.type != "cuda":
        return
    # benchmark picks the fastest kernels by timing them, which differs between runs (and after a resume)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    if precision == "fp32" and not cfg.deterministic:
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls (~10 bits of mantissa)
        log.info("fp32 on CUDA: matmuls and convolutions use TF32 (torch.set_float32_matmul_precision('high'))")


def lr_at(cfg: Config, step: int, steps_per_epoch: int, world_size: int) -> float:
    """Learning rate for an optimizer step: a pure function of the step, so resume needs no scheduler state."""
    base = cfg.lr * (world_size * cfg.grad_accum if cfg.lr_scale == "linear" else 1)
    warmup = cfg.warmup_epochs * steps_per_epoch
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if cfg.lr_schedule == "cosine":
        total = max(cfg.epochs * steps_per_epoch - warmup, 1)
        return base * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / total, 1.0)))
    return base


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach is the fast path on both CPU and GPU; fused only exists for (and helps on) CUDA.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay,
                                 **fast)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fast)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict`, then give every per-parameter state tensor its parameter's memory layout.
    Checkpoints store tensors contiguous (NCHW); load_state_dict keeps that layout, while the parameters of a
    channels_last model are NHWC. The fused CUDA kernels refuse such a mix (RuntimeError at the first step
    after a resume), and the fused CPU kernels silently pair the wrong elements."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            pstate = optimizer.state.get(param, {})
            for name, value in pstate.items():
                if (isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 1
                        and value.stride() != param.stride()):
                    pstate[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def run_info(cfg: Config, env: DistEnv, device: torch.device, precision: str, why: str,
             classes: list[str]) -> dict[str, Any]:
    import torchvision

    import dtl

    return {
        "launcher": env.launcher, "world_size": env.world_size, "device": str(device).split(":")[0],
        "precision": precision, "precision_source": why,
        "global_batch": cfg.batch_size * env.world_size * cfg.grad_accum,
        "num_classes": len(classes), "classes": classes,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "dtl": dtl.__version__},
    }


def prepare(cfg: Config, env: DistEnv, device: torch.device) -> Run:
    """Validate and build everything; nothing is written to the output folder before this returns."""
    precision, why = resolve_precision(cfg, env, device)
    configure_backends(cfg, device, precision)
    outdir = rundir.resolve(cfg, env, device)
    resume_from = rundir.check(outdir, cfg)

    splits = dtl_data.load_splits_once(cfg, env)
    # the ImageNet weights reach the hub cache once per node (rank 0 first), not once per rank at a time
    main_first(env, lambda first: models.fetch_weights(cfg.model, cfg.weights) if first else None)

    torch.manual_seed(cfg.seed)  # same initial head on every rank (DDP broadcasts rank 0's anyway)
    model = models.build_model(cfg.model, len(splits.classes), cfg.weights, cfg.image_size, cfg.dropout)
    if cfg.deterministic and device.type == "cuda":
        models.deterministic_pooling(model)
    trainable = models.freeze(model, cfg.model, cfg.mode, cfg.finetune_last_n)
    if cfg.mode == "transfer":
        models.FrozenPrefix(model, models.head_name(model))
    fmt = models.memory_format(device.type, cfg.mode)
    model = model.to(device, memory_format=fmt)
    optimizer = build_optimizer(cfg, model, device)
    scaler = torch.amp.GradScaler(device.type, init_scale=cfg.fp16_init_scale, enabled=precision == "fp16")
    progress = Progress()
    if resume_from is not None:
        progress = restore(resume_from, cfg, env, model, optimizer, scaler, len(splits.classes))
    info = run_info(cfg, env, device, precision, why, splits.classes)
    total, n_train = models.count_parameters(model)
    log.info("%s %s: %d params, %d trainable (%s)", cfg.model, cfg.mode, total, n_train,
             ", ".join(trainable) if len(trainable) <= 4 else f"{len(trainable)} tensors")
    compute_dtype = torch.float32  # autocast decides the matmul dtype; inputs stay fp32 for exactness
    train_loader, eval_loader = dtl_data.build_loaders(cfg, splits, env, device, compute_dtype,
                                                       channels_last=fmt == torch.channels_last)
    new_features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if cfg.cache_features:
        model, train_loader, eval_loader, new_features = use_cached_features(cfg, env, device, model, splits,
                                                                             outdir, precision)
    if env.distributed:
        # Frozen before wrapping: DDP reduces only parameters that require grad at construction.
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
        log.info("model wrapped in %s (%s backend, %d ranks)", type(model).__name__,
                 torch.distributed.get_backend(), env.world_size)
    if cfg.compile:
        model = torch.compile(model)
    return Run(cfg, env, device, outdir, model, optimizer, scaler, precision, train_loader, eval_loader,
               splits.classes, progress, info, splits=splits, new_features=new_features)


def use_cached_features(cfg: Config, env: DistEnv, device: torch.device, model: nn.Module, splits: Any,
                        outdir: Path, precision: str) -> tuple[nn.Module, Any, Any, dict]:
    """Replace the image loaders by feature loaders and the model by its head (see dtl.features)."""
    head = models.head_name(model)
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        log.warning("--cache-features computes features with dropout off (eval mode); the uncached run keeps "
                    "the backbone's dropout active: pass --dropout 0 to compare the two")
    found, new = {}, {}
    for name, split in (("train", splits.train), ("test", splits.test)):
        hit = features.cached(outdir, cfg, name, len(split), device)
        if hit is None:
            loader = dtl_data.eval_loader(cfg, split, env, device)
            hit = new[name] = features.extract(model, head, loader, env, lambda: autocast_for(precision, device))
        found[name] = hit
    log.info("cached features: train %s, test %s (%s)", tuple(found["train"][0].shape),
             tuple(found["test"][0].shape), "computed" if new else f"reused from {outdir / 'features'}")
    train = features.FeatureLoader(*found["train"], dtl_data.train_sampler(len(splits.train), env, cfg.seed),
                                   cfg.batch_size)
    test = features.FeatureLoader(*found["test"],
                                  dtl_data.EvalShardSampler(len(splits.test), env.rank, env.world_size),
                                  cfg.batch_size)
    return features.FeatureHead(model, head), train, test, new


def restore(path: Path, cfg: Config, env: DistEnv, model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, num_classes: int) -> Progress:
    state = ckpt.load_checkpoint(path)
    meta = state["meta"]
    ckpt.check_compatible(meta, cfg.model, num_classes, path)
    models.load_into(model, state["model"], f"checkpoint {path}")
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    if meta.get("trainable") != trainable:
        raise UserError(f"{path} was trained with other trainable parameters (mode {meta['config']['mode']!r}); "
                        "resume with the same --mode/--finetune-last-n or start a new --output-dir")
    load_optimizer_state(optimizer, state["optim"])
    if meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    progress = Progress(**meta["progress"])
    key = f"cpu.rank{env.rank}"
    if progress.step_in_epoch and meta.get("world_size") == env.world_size and key in state["rng"]:
        torch.set_rng_state(state["rng"][key])
        if torch.cuda.is_available() and f"cuda.rank{env.rank}" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"][f"cuda.rank{env.rank}"])
    elif progress.step_in_epoch and meta.get("world_size") != env.world_size:
        log.warning("resuming mid-epoch with a different world size (%s -> %d): the data order of the rest of "
                    "this epoch differs from the interrupted run", meta.get("world_size"), env.world_size)
    log.info("resumed from %s (epoch %d, step %d of the epoch)", path, progress.epoch, progress.step_in_epoch)
    return progress


# ---- checkpoints -------------------------------------------------------------------------------

def gather_rng(run: Run) -> dict[str, torch.Tensor]:
    """Every rank's RNG state (a collective: all ranks call it), keyed by rank for rank 0 to save."""
    out: dict[str, torch.Tensor] = {}
    states = {"cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(run.device)
    for name, state in states.items():
        for r, s in enumerate(all_gather_tensor(state.to(_collective_device(run)), run.env)):
            out[f"{name}.rank{r}"] = s.cpu()
    return out


def _collective_device(run: Run) -> torch.device:
    return run.device if run.env.distributed else torch.device("cpu")


def save(run: Run, is_best: bool = False) -> Path | None:
    """Checkpoint the current position (a collective for the RNG states; rank 0 writes)."""
    rng = gather_rng(run)
    path = None
    if run.env.is_main:
        meta = {"progress": vars(run.progress), "config": run.cfg.to_dict(), "num_classes": len(run.classes),
                "world_size": run.env.world_size, "run": run.info, "scaler": run.scaler.state_dict(),
                "trainable": [k for k, p in unwrap(run.model).named_parameters() if p.requires_grad],
                "global_step": run.progress.global_step, "best_acc": run.progress.best_acc}
        path = ckpt.save_checkpoint(run.outdir, model_state=unwrap(run.model).state_dict(),
                                    optim_state=run.optimizer.state_dict(), rng=rng, meta=meta,
                                    keep_last=run.cfg.keep_last, is_best=is_best)
    run.last_ckpt_time = time.monotonic()
    # nobody leaves (or gets killed by the launcher) while rank 0 is still writing; the others wait on the CPU
    # group, not in an NCCL collective whose timeout a 1.6 GB VGG16 + AdamW checkpoint could outlast
    wait_for_main(run.env)
    return path


def checkpoint_due(run: Run, agreed_time_due: bool, last_step: bool) -> bool:
    """A mid-epoch checkpoint at this step: every N steps (the same on every rank by construction), or when
    rank 0's clock said the minutes had passed (agreed through `dist.Agreement`)."""
    if last_step:  # the epoch's end checkpoints anyway
        return False
    every = run.cfg.checkpoint_every_steps
    return bool(every and run.progress.global_step % every == 0) or agreed_time_due


def time_due(run: Run) -> bool:
    """Rank 0 alone decides on time; the others follow through the agreement."""
    minutes = run.cfg.checkpoint_every_minutes
    return bool(minutes) and run.env.is_main and time.monotonic() - run.last_ckpt_time >= 60 * minutes


# ---- the loops ---------------------------------------------------------------------------------

def inject_fault(kind: str, loss: torch.Tensor) -> torch.Tensor:
    """Testing hook (--fault-step/--fault-kind/--fault-rank): what clusters do to jobs, on demand."""
    if kind == "raise":
        raise RuntimeError("injected fault (--fault-kind raise)")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return loss * float("nan")


def check_replicas(run: Run) -> None:
    """DDP keeps replicas identical by construction; verify it (one checksum per rank) rather than assume.
    Summed parameter by parameter: one float64 copy of VGG16 at once would be ~4 GB of temporaries."""
    if not run.env.distributed:
        return
    params = list(unwrap(run.model).parameters())
    checksum = torch.zeros(2, dtype=torch.float64, device=params[0].device)
    offset = 0
    for p in params:
        flat = p.detach().flatten().double()
        weights = (torch.arange(offset + 1, offset + flat.numel() + 1, dtype=torch.float64, device=flat.device)
                   % 9973)
        checksum[0] += flat.sum()
        checksum[1] += (flat * weights).sum()
        offset += flat.numel()
    sums = all_gather_tensor(checksum, run.env)
    if any(not torch.equal(sums[0], s) for s in sums[1:]):
        raise RuntimeError(f"replicas diverged: parameter checksums per rank {[s.tolist() for s in sums]}")
    log.info("replicas in sync: identical parameter checksums on all %d ranks", run.env.world_size)


def sync_point(run: Run, bad_step: torch.Tensor) -> None:
    """Read the device-side counters (only where the host waits anyway: checkpoints, epoch ends). Abort
    policy: stop before anything is saved when a step had a non-finite loss."""
    p = run.progress
    p.overflow_skips += int(run.overflows.item())
    run.overflows.zero_()
    step = int(bad_step.item())
    if step >= 0:
        last = ckpt.latest_checkpoint(run.outdir)
        where = f"--resume {last}" if last else "a fresh run (no checkpoint was written yet)"
        raise NonFiniteLossError(f"non-finite loss at global step {step}; nothing was saved after it. "
                                 f"Lower --lr, check the data, or use --nan-policy skip; resume from {where}")


def optimizer_step(run: Run, bad_step: torch.Tensor, loss_finite: torch.Tensor) -> None:
    """lr -> unscale -> finite check -> step -> zero_grad. `loss_finite`: the step's losses were all finite
    (a device tensor)."""
    p = run.progress
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.cfg, p.global_step, run.steps_per_epoch, run.env.world_size)
    scaler = run.scaler
    if scaler.is_enabled():
        # fp16: gradients that overflow the loss scale are expected (at the start, after each scale growth);
        # GradScaler skips those steps itself and lowers the scale. Only a non-finite *loss* is an error.
        # Both are decided on the device: no host sync.
        scaler.unscale_(run.optimizer)
        found_inf = sum(v for v in scaler._found_inf_per_device(run.optimizer).values())
        run.overflows += (loss_finite & (found_inf > 0)).to(torch.int64)
        finite = loss_finite
    else:
        grads = [q.grad for g in run.optimizer.param_groups for q in g["params"] if q.grad is not None]
        # DDP already averaged the gradients, so a NaN on any rank is a NaN on every rank: all agree for free.
        # One fused pass over the gradients (per-tensor norms, then the small result checked): isfinite() on
        # each gradient allocated full-size temporaries, +700 MiB and 1-2 s per step for VGG16 on a CPU.
        finite = torch.stack(torch._foreach_norm(grads)).isfinite().all() if grads else loss_finite
        finite = finite & loss_finite
    if run.cfg.nan_policy == "skip":
        if not bool(finite):  # the skip policy pays one host sync per step to decide
            p.nan_skips += 1
            p.nan_skips_total += 1
            if p.nan_skips > run.cfg.max_nan_skips:
                raise NonFiniteLossError(f"{p.nan_skips} non-finite steps in a row up to step {p.global_step}")
            log.warning("non-finite loss at step %d: update skipped (%d in a row)", p.global_step, p.nan_skips)
            run.optimizer.zero_grad(set_to_none=True)
            scaler.update()
            return
        p.nan_skips = 0
    else:
        # remember the first bad step on the device: read only at sync points, never here
        bad_step.copy_(torch.where(finite | (bad_step >= 0), bad_step, torch.full_like(bad_step, p.global_step)))
    scaler.step(run.optimizer)
    scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def forward_backward(run: Run, images: torch.Tensor, labels: torch.Tensor, criterion: nn.Module, meter: Meter,
                     sync: bool = True) -> torch.Tensor:
    """One micro-step: forward under autocast, scaled backward (gradient all-reduce only when `sync`),
    device-side metric sums. No host sync. Returns whether the loss was finite (a device tensor)."""
    p = run.progress
    ddp = ddp_of(run.model)  # also under torch.compile, whose wrapper is not a DDP instance
    no_sync = ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext()
    with no_sync:
        with run.autocast():
            logits = run.model(images)
            loss = criterion(logits, labels)
        if run.cfg.fault_step == p.global_step and run.cfg.fault_rank in (None, run.env.rank):
            loss = inject_fault(run.cfg.fault_kind, loss)
        run.scaler.scale(loss / run.accum).backward()
    # A non-finite step (skipped or about to abort) must not poison the epoch's sums.
    finite = torch.isfinite(loss.detach())
    meter.update(torch.where(finite, loss.detach() * labels.shape[0], 0.0),
                 torch.where(finite, (logits.argmax(1) == labels).sum(), 0), finite * labels.shape[0])
    return finite


def train_one_epoch(run: Run, epoch: int) -> str:
    """One epoch from the saved position; returns "done" or "stopped" (a signal arrived)."""
    cfg, p, env = run.cfg, run.progress, run.env
    start_batch = p.step_in_epoch * run.accum
    if start_batch == 0:
        torch.manual_seed(dtl_data.stream_seed(cfg.seed, epoch, env.rank, 1))  # dropout stream per epoch/rank
    run.train_loader.set_epoch(epoch, start_batch)
    meter = Meter(run.device)
    if env.is_main:
        meter.load(p.partial_meter)
    model = run.model
    model.train()
    models.freeze_frozen_norms(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    bad_step = torch.tensor(-1, device=run.device)
    agreement = Agreement(env)  # stop flag + rank 0's "checkpoint time", without a per-step round trip
    n_batches = len(run.train_loader)
    bar = tqdm(total=n_batches, initial=start_batch, desc=f"epoch {epoch + 1}/{cfg.epochs} train",
               disable=not env.is_main, dynamic_ncols=True, leave=False)
    t0 = time.perf_counter() - p.partial_seconds
    loss_finite = torch.ones((), dtype=torch.bool, device=run.device)
    stop = False
    for i, (images, labels) in enumerate(run.train_loader, start=start_batch):
        last_micro = (i + 1) % run.accum == 0 or i + 1 == n_batches
        loss_finite &= forward_backward(run, images, labels, criterion, meter, sync=last_micro)
        bar.update(1)
        if not last_micro:
            continue
        optimizer_step(run, bad_step, loss_finite)
        loss_finite.fill_(True)
        p.global_step += 1
        p.step_in_epoch += 1
        if env.is_main and (p.step_in_epoch % cfg.log_every == 0):
            loss_sum, correct, count = meter.local()  # the one host sync of a log interval
            bar.set_postfix(loss=f"{loss_sum / max(count, 1):.3f}", acc=f"{correct / max(count, 1):.3f}",
                            img_s=f"{count / max(time.perf_counter() - t0, 1e-9):.0f}")
        last = i + 1 == n_batches
        stop, agreed_time = agreement.drain() if last else agreement.step(signals.requested(), time_due(run))
        if stop or checkpoint_due(run, agreed_time, last):
            sync_point(run, bad_step)
            p.partial_meter = meter.reduced_totals(env)
            p.partial_seconds = time.perf_counter() - t0
            save(run)
            if stop:
                bar.close()
                return "stopped"
    agreement.drain()
    bar.close()
    sync_point(run, bad_step)
    run.info["_train"] = meter.reduced(env)
    run.info["_train_seconds"] = time.perf_counter() - t0
    return "done"


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, env: DistEnv, autocast: Any,
             desc: str = "eval") -> dict[str, float]:
    """Loss/accuracy over this rank's contiguous shard, summed over ranks: every image counted once.
    Runs without the DDP/compile wrappers so no DDP buffer broadcast is started that other ranks would not join."""
    model = local_module(model)
    was_training = model.training
    model.eval()
    meter = Meter(device)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for images, labels in tqdm(loader, desc=desc, disable=not env.is_main, leave=False, dynamic_ncols=True):
        with autocast():
            logits = model(images)
        meter.update(criterion(logits.float(), labels), (logits.argmax(1) == labels).sum(), labels.shape[0])
    model.train(was_training)
    return meter.reduced(env)


def end_epoch(run: Run, epoch: int) -> None:
    p = run.progress
    test = evaluate(run.model, run.eval_loader, run.device, run.env, run.autocast)
    train = run.info.pop("_train")
    seconds = run.info.pop("_train_seconds")
    row = {"epoch": epoch + 1, "train_loss": train["loss"], "train_acc": train["acc"],
           "train_count": train["count"], "test_loss": test["loss"], "test_acc": test["acc"],
           "test_count": test["count"], "lr": run.optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
           "images_per_sec": train["count"] / max(seconds, 1e-9), "global_step": p.global_step,
           "nan_skips": p.nan_skips_total}
    if run.scaler.is_enabled():
        row["overflow_skips"] = p.overflow_skips
        row["loss_scale"] = run.scaler.get_scale()
    is_best = test["acc"] > p.best_acc
    p.best_acc = max(p.best_acc, test["acc"])
    p.epoch, p.step_in_epoch, p.partial_meter, p.partial_seconds = epoch + 1, 0, [0.0, 0.0, 0.0], 0.0
    if run.env.is_main:
        append_metrics(run.outdir, row)
        if run.tb is not None:
            for key, value in row.items():
                if key != "epoch":
                    run.tb.add_scalar(key, value, epoch + 1)
            run.tb.flush()
        log.info("epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f (%d images) | %.1f img/s",
                 epoch + 1, run.cfg.epochs, row["train_loss"], row["train_acc"], row["test_loss"],
                 row["test_acc"], row["test_count"], row["images_per_sec"])
    save(run, is_best=is_best)


def fit(run: Run) -> int:
    """Epochs from the saved position to the end; the exit code."""
    for epoch in range(run.progress.epoch, run.cfg.epochs):
        if train_one_epoch(run, epoch) == "stopped":
            rundir.write_status(run, "preempted", EXIT_PREEMPTED)
            log.warning("stopped by %s at global step %d (epoch %d); checkpoint written; exit code %d, "
                        "continue with --resume auto", "/".join(signals.received()) or "a peer's signal",
                        run.progress.global_step, epoch + 1, EXIT_PREEMPTED)
            return EXIT_PREEMPTED
        end_epoch(run, epoch)
    check_replicas(run)
    if run.env.is_main:
        ckpt.write_tensors(run.outdir / "model.safetensors", unwrap(run.model).state_dict())
        plot_runs([run.outdir], run.outdir / "curves.png")
        rundir.write_status(run, "completed", EXIT_OK)
        log.info("done: %s", run.outdir)
    barrier(run.env)
    return EXIT_OK


def train(cfg: Config, env: DistEnv, device: torch.device) -> int:
    run = prepare(cfg, env, device)
    rundir.start(run)
    if env.is_main:
        for name, (feats, labels) in run.new_features.items():
            features.store(run.outdir, cfg, name, feats, labels)
    if run.new_features:
        wait_for_main(env)  # ~1 GB of features for CIFAR-10 at 224 px: not under the NCCL timeout
    try:
        with torch.autograd.set_detect_anomaly(cfg.debug):
            return fit(run)
    except Exception:
        rundir.write_status(run, "failed", 1)
        raise
    finally:
        if run.tb is not None:
            run.tb.close()
