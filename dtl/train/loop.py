"""The training loop, top to bottom: `train_step` (micro-steps + one optimizer step), `train_one_epoch`
(steps from the saved position, stop agreement, mid-epoch checkpoints), `end_epoch` (evaluate, log, save)
and `fit` (epochs to the end). No host sync inside a step."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dtl import faults, files, models
from dtl.data.augment import mix
from dtl.data.splits import stream_seed
from dtl.dist import Agreement, all_gather_tensor, barrier, ddp_of, local_module, signals, unwrap, wrap
from dtl.errors import EXIT_OK, EXIT_PREEMPTED, NonFiniteLossError
from dtl.train import checkpoint_format as ckpt
from dtl.train import run_folder
from dtl.train.ema import EmaView
from dtl.train.evaluate import evaluate
from dtl.train.metrics import Meter, plot_runs
from dtl.train.optim import lr_at
from dtl.train.progress_bar import Progress
from dtl.train.state import Run

log = logging.getLogger("dtl")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StepStats:
    images: int
    losses: list[torch.Tensor]
    """The step's micro-batch losses (detached device tensors)."""

    @property
    def loss_finite(self) -> torch.Tensor:
        """All the step's losses were finite (a device tensor: reading it is a host sync)."""
        return torch.stack(self.losses).isfinite().all()


@dataclass(frozen=True)
class EpochResult:
    """How an epoch ended: stopped by a signal (checkpoint written), or done with its training sums."""

    stopped: bool
    loss: float = 0.0
    acc: float = 0.0
    count: int = 0
    seconds: float = 0.0
    grad_norm_mean: float = 0.0
    """Pre-clip global gradient norm over the epoch's optimizer steps (with --clip-grad-norm)."""
    grad_norm_max: float = 0.0


# ---- one step ----------------------------------------------------------------------------------

def forward_backward(run: Run, images: torch.Tensor, labels: torch.Tensor, criterion: nn.Module, meter: Meter,
                     sync: bool = True, targets: torch.Tensor | None = None) -> torch.Tensor:
    """One micro-step: forward under autocast, scaled backward (gradient all-reduce only when `sync`),
    device-side metric sums. The loss is taken against `targets` (MixUp/CutMix soft targets) when given, else
    `labels`; accuracy always against `labels`. Returns the loss (detached; `optimizer_step` checks it)."""
    p = run.progress
    ddp = ddp_of(run.model)  # also under torch.compile, whose wrapper is not a DDP instance
    no_sync = ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext()
    fault = faults.from_env()
    with no_sync:
        with run.precision.autocast():
            logits = run.model(images)
            loss = criterion(logits, labels if targets is None else targets)
        if fault.due(p.global_step, run.env.rank):
            loss = faults.inject(fault.kind, loss)
        # Dividing by 1 is exact, so without accumulation the division and its backward are left out (every
        # small op is a kernel launch and a few microseconds of host time, per step).
        run.scaler.scale(loss if run.accum == 1 else loss / run.accum).backward()
    meter.add(loss, (logits.argmax(1) == labels).sum(), int(labels.shape[0]))  # a non-finite loss is left out
    return loss.detach()


def clip_gradients(grads: list[torch.Tensor], norms: list[torch.Tensor], max_norm: float,
                   stats: torch.Tensor) -> None:
    """Scale the gradients so their global norm is at most `max_norm` (from the per-tensor norms already
    computed for the finite check: no second pass), and add the pre-clip norm to `stats` (sum, max, count),
    all on the device."""
    total = torch.linalg.vector_norm(torch.stack(norms))
    stats[0] += total.double()
    stats[1] = torch.maximum(stats[1], total.double())
    stats[2] += 1
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))


def optimizer_step(run: Run, bad_step: torch.Tensor, losses: list[torch.Tensor]) -> None:
    """lr -> unscale -> finite check (gradients and `losses`, the step's micro-batch losses) -> clip -> step
    -> zero_grad."""
    p, scaler, settings = run.progress, run.scaler, run.cfg.optim
    base = lr_at(settings, p.global_step, run.steps_per_epoch, run.env.world_size)
    for group in run.optimizer.param_groups:
        group["lr"] = base * group.get("lr_mult", 1.0)
    scaler.unscale_(run.optimizer)  # a no-op without fp16
    grads: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    if settings.clip_grad_norm is not None or not scaler.is_enabled():
        grads = [q.grad for g in run.optimizer.param_groups for q in g["params"] if q.grad is not None]
        # One fused pass (per-tensor norms, then the small result checked): isfinite() on each gradient
        # allocated full-size temporaries, +700 MiB and 1-2 s per step for VGG16 on a CPU.
        norms = torch._foreach_norm(grads) if grads else []
    if scaler.is_enabled():
        # fp16: gradients that overflow the loss scale are expected (at the start, after each scale growth);
        # GradScaler skips those steps itself and lowers the scale. Only a non-finite *loss* is an error.
        # Both are decided on the device: no host sync.
        found_inf = sum(v for v in scaler._found_inf_per_device(run.optimizer).values())
        finite = torch.stack(losses).isfinite().all()
        run.overflows += (finite & (found_inf > 0)).to(torch.int64)
    else:
        # DDP already averaged the gradients, so a NaN on any rank is a NaN on every rank: all agree for free.
        # One check over the gradient norms and the losses together: each op costs a launch per step.
        finite = torch.stack([*norms, *losses]).isfinite().all()
    if settings.clip_grad_norm is not None and grads:
        clip_gradients(grads, norms, settings.clip_grad_norm, run.grad_norms)
    if run.cfg.run.nan_policy == "skip":
        if not bool(finite):  # the skip policy pays one host sync per step to decide
            p.nan_skips += 1
            p.nan_skips_total += 1
            if p.nan_skips > run.cfg.run.max_nan_skips:
                raise NonFiniteLossError(f"{p.nan_skips} non-finite steps in a row up to step {p.global_step}")
            log.warning("non-finite loss at step %d: update skipped (%d in a row)", p.global_step, p.nan_skips)
            run.optimizer.zero_grad(set_to_none=True)
            scaler.update()
            return
        p.nan_skips = 0
    else:
        # remember the first bad step on the device: read only at sync points, never here
        bad_step.masked_fill_(~finite & (bad_step < 0), p.global_step)
    scaler.step(run.optimizer)
    scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def train_step(run: Run, batches: Sequence[Batch], criterion: nn.Module, meter: Meter,
               bad_step: torch.Tensor, first_batch: int = 0) -> StepStats:
    """One optimizer step over `batches` (grad_accum micro-batches; the last synchronises the gradients);
    `first_batch`: the epoch's index of the first of them (it seeds MixUp/CutMix)."""
    losses = []
    for j, (images, labels) in enumerate(batches):
        targets = None
        if run.mixer is not None:  # here, not in a loader: one code path for both pipelines
            mixed = run.mixer(images, labels, run.progress.epoch, first_batch + j)
            images, labels, targets = mixed.images, mixed.labels, mixed.targets
        losses.append(forward_backward(run, images, labels, criterion, meter, sync=j == len(batches) - 1,
                                       targets=targets))
    optimizer_step(run, bad_step, losses)
    if run.ema is not None:
        run.ema.update(run.progress.global_step)
    run.progress.global_step += 1
    return StepStats(sum(int(labels.shape[0]) for _, labels in batches), losses)


def step_groups(run: Run, start_batch: int) -> Iterator[tuple[int, list[Batch]]]:
    """(index of the group's last batch, the micro-batches of one optimizer step) from the train loader."""
    n_batches, group = len(run.train_loader), []
    for i, batch in enumerate(run.train_loader, start=start_batch):
        group.append(batch)
        if (i + 1) % run.accum == 0 or i + 1 == n_batches:
            yield i, group
            group = []


# ---- sync points -------------------------------------------------------------------------------

def sync_point(run: Run, bad_step: torch.Tensor) -> None:
    """Read the device-side counters (only where the host waits anyway: checkpoints, epoch ends). Abort
    policy: stop before anything is saved when a step had a non-finite loss."""
    p = run.progress
    p.overflow_skips += int(run.overflows.item())
    run.overflows.zero_()
    step = int(bad_step.item())
    if step >= 0:
        last = run.checkpointer.last
        where = f"--resume {last}" if last else "a fresh run (no checkpoint was written yet)"
        raise NonFiniteLossError(f"non-finite loss at global step {step}; nothing was saved after it. "
                                 f"Lower --lr, check the data, or use --nan-policy skip; resume from {where}")


def save(run: Run, is_best: bool = False, best_source: str = "raw") -> None:
    run.checkpointer.save(run.model, run.optimizer, run.scaler, run.progress, is_best, run.ema, best_source)


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


# ---- epochs ------------------------------------------------------------------------------------

def train_one_epoch(run: Run, epoch: int) -> EpochResult:
    """One epoch from the saved position."""
    cfg, p, env = run.cfg, run.progress, run.env
    start_batch = p.step_in_epoch * run.accum
    if start_batch == 0:
        torch.manual_seed(stream_seed(cfg.run.seed, epoch, env.rank, 1))  # dropout stream per epoch/rank
    run.train_loader.set_epoch(epoch, start_batch)
    meter = Meter(run.device)
    if env.is_main:
        meter.load(p.partial_meter)
    run.model.train()
    models.freeze_frozen_norms(run.model)
    criterion = mix.criterion_for(cfg.optim, run.class_weights)
    bad_step = torch.tensor(-1, device=run.device)
    agreement = Agreement(env)  # stop flag + rank 0's "checkpoint time", without a per-step round trip
    n_batches = len(run.train_loader)
    bar = Progress(n_batches, f"epoch {epoch + 1}/{cfg.optim.epochs} train", env.is_main, initial=start_batch,
                   every_s=cfg.run.progress_every)
    t0 = time.perf_counter() - p.partial_seconds
    run.grad_norms.copy_(torch.tensor(p.partial_grad_norms, dtype=torch.float64))
    for i, batches in step_groups(run, start_batch):
        train_step(run, batches, criterion, meter, bad_step, first_batch=i + 1 - len(batches))
        p.step_in_epoch += 1
        bar.update(len(batches))
        if bar.wants_stats(p.step_in_epoch % cfg.run.log_every == 0):
            loss_sum, correct, count = meter.local()  # the one host sync of a log interval
            bar.show(loss=f"{loss_sum / max(count, 1):.3f}", acc=f"{correct / max(count, 1):.3f}",
                     img_s=f"{count / max(time.perf_counter() - t0, 1e-9):.0f}")
        last = i + 1 == n_batches
        flags = agreement.drain() if last else agreement.step(signals.requested(), run.checkpointer.time_due())
        stop, time_due = flags
        if stop or run.checkpointer.due(p.global_step, time_due, last):
            sync_point(run, bad_step)
            p.partial_meter = meter.reduced_totals(env)
            p.partial_seconds = time.perf_counter() - t0
            p.partial_grad_norms = run.grad_norms.tolist()
            save(run)
            if stop:
                bar.close()
                return EpochResult(stopped=True)
    agreement.drain()
    bar.close()
    sync_point(run, bad_step)
    train = meter.reduced(env)
    norm_sum, norm_max, norm_count = run.grad_norms.tolist()
    return EpochResult(False, train["loss"], train["acc"], int(train["count"]), time.perf_counter() - t0,
                       norm_sum / max(norm_count, 1), norm_max)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's rate at the last step (each group runs at its multiple of it)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_mult", 1.0)


def end_epoch(run: Run, epoch: int, train: EpochResult) -> None:
    """Evaluate, log the epoch's row (rank 0), checkpoint."""
    p = run.progress
    per_class = run.cfg.data.class_balance != "none"
    tta = run.cfg.run.tta
    test = evaluate(run.model, run.eval_loader, run.device, run.env, run.precision, len(run.splits.classes),
                    confusion=per_class, tta=tta)
    scores = {"raw": test.top1}
    row = {"epoch": epoch + 1, "train_loss": train.loss, "train_acc": train.acc, "train_count": train.count,
           "test_loss": test.loss, "test_acc": test.top1, "test_count": test.count,
           "lr": base_lr(run.optimizer), "epoch_seconds": train.seconds,
           "images_per_sec": train.count / max(train.seconds, 1e-9), "global_step": p.global_step,
           "nan_skips": p.nan_skips_total}
    if test.plain is not None:
        row["test_loss_plain"], row["test_acc_plain"] = test.plain.loss, test.plain.top1
    if test.confusion is not None:
        counts = test.confusion.sum(1).clamp(min=1)
        row["test_acc_per_class"] = (test.confusion.diagonal() / counts).tolist()
    if run.cfg.optim.clip_grad_norm is not None:
        row["grad_norm_mean"], row["grad_norm_max"] = train.grad_norm_mean, train.grad_norm_max
    if run.ema is not None:
        local = local_module(run.model)
        view = EmaView(local, run.ema, "wrapped_model." if hasattr(local, "wrapped_model") else "")
        ema_test = evaluate(view, run.eval_loader, run.device, run.env, run.precision, len(run.splits.classes),
                            desc="eval (EMA)", tta=tta)
        row["test_loss_ema"], row["test_acc_ema"] = ema_test.loss, ema_test.top1
        scores["ema"] = ema_test.top1
    if run.scaler.is_enabled():
        row["overflow_skips"] = p.overflow_skips
        row["loss_scale"] = run.scaler.get_scale()
    best_of = run.cfg.checkpoint.best_of
    candidates = {k: v for k, v in scores.items() if best_of == "both" or k == best_of} or scores
    source, score = max(candidates.items(), key=lambda kv: kv[1])
    is_best = score > p.best_acc
    p.best_acc = max(p.best_acc, score)
    if run.cfg.run.early_stop_patience:
        is_best, source = early_stop_update(run, epoch, row[run.cfg.run.early_stop_metric]), "raw"
    p.end_epoch(epoch)
    if run.metrics_log is not None:
        run.metrics_log.append(row)
        log.info("epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f (%d images) | %.1f img/s",
                 epoch + 1, run.cfg.optim.epochs, row["train_loss"], row["train_acc"], row["test_loss"],
                 row["test_acc"], row["test_count"], row["images_per_sec"])
    save(run, is_best=is_best, best_source=source)


def write_status(run: Run, state: str, exit_code: int | None) -> None:
    p = run.progress
    extra = {"best_epoch": p.early_stop_best_epoch} if p.early_stopped else None
    run_folder.write_status(run.outdir, run.env, state, exit_code, (p.epoch, p.global_step), run.checkpointer.last,
                        extra)


def early_stop_update(run: Run, epoch: int, value: float) -> bool:
    """Track --early-stop-metric (the all-reduced test metric: the same on every rank, so every rank stops at
    the same epoch); whether this epoch is the best so far."""
    p, settings = run.progress, run.cfg.run
    if p.early_stop_best is None:
        improved = True
    else:  # how much better than the best so far (lower loss, higher accuracy)
        gain = p.early_stop_best - value if settings.early_stop_metric == "test_loss" else value - p.early_stop_best
        improved = gain > settings.early_stop_min_delta
    if improved:
        p.early_stop_best, p.early_stop_best_epoch, p.early_stop_bad_epochs = value, epoch + 1, 0
    else:
        p.early_stop_bad_epochs += 1
    p.early_stopped = p.early_stop_bad_epochs >= (settings.early_stop_patience or 0)
    return improved


def finish_early_stopped(run: Run) -> None:
    """model.safetensors becomes the best epoch's weights (rank 0)."""
    best = ckpt.best_or_last(run.outdir)
    files.write_tensors(run.outdir / "model.safetensors", files.read_tensors(best / "model.safetensors"))
    log.info("early stop: no %s improvement for %d epochs; model.safetensors holds the best epoch's weights "
             "(epoch %d, %s)", run.cfg.run.early_stop_metric, run.progress.early_stop_bad_epochs,
             run.progress.early_stop_best_epoch, best)


def apply_phase(run: Run, epoch: int) -> None:
    """lp-ft: the head alone for the first --lp-epochs epochs (backbone frozen and run under no_grad, its
    BatchNorm statistics fixed), then the backbone (or its last --finetune-last-n blocks) too. DDP reduces only
    what required grad when it was built, so it is built again at the switch (every rank at the same epoch)."""
    net = run.cfg.backbone
    probing = epoch < net.lp_epochs
    if net.mode != "lp-ft" or run.probing == probing:
        return
    model = unwrap(run.model)
    head = models.head_name(model)
    models.freeze(model, net.model, "transfer" if probing else "finetune", None if probing else net.finetune_last_n)
    for handle in run.prefix_hooks:
        handle.remove()
    run.prefix_hooks = models.run_prefix_without_grad(model, head) if probing else []
    run.model = wrap(model, run.env, run.device, compile_model=run.cfg.run.compile)
    run.probing = probing
    trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("lp-ft epoch %d: %s (%d parameters train)", epoch + 1,
             "linear probe, the backbone frozen" if probing else "fine-tuning, the backbone unfrozen", trains)


def fit(run: Run) -> int:
    """Epochs from the saved position to the end (or an early stop); the exit code."""
    for epoch in range(run.progress.epoch, run.cfg.optim.epochs):
        if run.progress.early_stopped:
            break
        apply_phase(run, epoch)
        result = train_one_epoch(run, epoch)
        if result.stopped:
            write_status(run, "preempted", EXIT_PREEMPTED)
            log.warning("stopped by %s at global step %d (epoch %d); checkpoint written; exit code %d, "
                        "continue with --resume auto", "/".join(signals.received()) or "a peer's signal",
                        run.progress.global_step, epoch + 1, EXIT_PREEMPTED)
            return EXIT_PREEMPTED
        end_epoch(run, epoch, result)
    check_replicas(run)
    if run.env.is_main:
        files.write_tensors(run.outdir / "model.safetensors", unwrap(run.model).state_dict())
        if run.ema is not None:
            files.write_tensors(run.outdir / "model_ema.safetensors", run.ema.full_state(unwrap(run.model)))
        plot_runs([run.outdir], run.outdir / "curves.png")
        if run.progress.early_stopped:
            finish_early_stopped(run)
        if run.metrics_log is not None:
            run.metrics_log.log_artifacts([run.outdir / n for n in ("model.safetensors", "curves.png")])
        write_status(run, "early-stopped" if run.progress.early_stopped else "completed", EXIT_OK)
        log.info("done: %s", run.outdir)
    barrier(run.env)
    return EXIT_OK
