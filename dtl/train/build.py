"""Building a run: everything is validated and built here (folder plan, data, weights, model, optimizer,
checkpoint to resume, loaders, wrappers) before anything is written to the run folder."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace

import torch
import torchvision
from torch import nn

import dtl
from dtl import faults, models
from dtl.config import Config, fsdp_conflict
from dtl.data import datasets, features, image_cache, loaders, samplers
from dtl.data.augment import mix
from dtl.data.loaders import BatchLoader
from dtl.data.preprocessing import Preprocessing
from dtl.data.splits import Splits
from dtl.distributed import DistEnv, GradCompression, ProcessGroups, fsdp
from dtl.errors import UserError
from dtl.train import run_folder, trackers
from dtl.train.checkpoint.checkpointer import Checkpointer
from dtl.train.hooks import hooks_for
from dtl.train.optimisation.ema import Ema
from dtl.train.optimisation.optimizer import build_optimizer, log_groups, table
from dtl.train.optimisation.precision import Precision, configure_backends, resolve
from dtl.train.parts import RunInfo, RunParts
from dtl.train.run_folder import RunFolder
from dtl.train.train_state import TrainState
from dtl.train.trained_model import TrainedModel

log = logging.getLogger("dtl")


def run_info(cfg: Config, env: DistEnv, device: torch.device, precision: Precision,
             classes: list[str], param_groups: list[dict[str, float | int | str]], prep: Preprocessing) -> RunInfo:
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "dtl": dtl.__version__,
                **models.backbone(cfg.backbone.model).versions()}
    return RunInfo(launcher=env.launcher, world_size=env.world_size, device=str(device).split(":")[0],
                   precision=precision.name, precision_source=precision.source,
                   global_batch=cfg.optim.batch_size * env.world_size * cfg.optim.grad_accum, num_classes=len(classes),
                   classes=list(classes),
                   versions=versions, param_groups=param_groups,
                   preprocessing=prep.to_dict(),
                   backend=str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None)


def preprocessing_of(cfg: Config) -> Preprocessing:
    """The backbone's normalisation, with the resampling the run's data pipeline applies."""
    return models.preprocessing(cfg.backbone.model).for_pipeline(loaders.resolve_pipeline(cfg))


def build_model(cfg: Config, device: torch.device, num_classes: int,
                memory_format: torch.memory_format) -> tuple[nn.Module, list[str]]:
    """The backbone with its new head, frozen per mode, on the device in `memory_format` (not wrapped)."""
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    net = cfg.backbone
    model = models.build_model(net.model, num_classes, net.weights, cfg.data.image_size, net.dropout,
                               net.drop_path, keep_head=net.keep_head,
                               # scratch: the head is part of the random init, drawn from the same stream
                               head_seed=cfg.run.seed if net.weights != "none" else None)
    if cfg.run.deterministic and device.type == "cuda":
        models.deterministic_pooling(model)
    # lp-ft: the optimizer covers everything that will ever train (from step 0, so a resume on either side of
    # the unfreezing restores the same groups); `TrainedModel.set_phase` freezes the backbone for the probe epochs
    trainable = models.freeze(model, net.model, "finetune" if net.mode == "lp-ft" else net.mode,
                              net.finetune_last_n)
    if cfg.backbone.mode == "transfer":
        models.run_prefix_without_grad(model, models.head_name(model))
    return model.to(device, memory_format=memory_format), trainable


def resolve_strategy(cfg: Config, env: DistEnv) -> str:
    """ddp | fsdp: --strategy, or for auto what `accelerate launch` was configured with; fsdp needs a process
    group (in one process there is nothing to shard: the run trains unsharded, with a warning)."""
    strategy = cfg.dist.strategy
    if strategy == "auto":
        strategy = "fsdp" if env.accelerate_fsdp else "ddp"
        conflict = fsdp_conflict(cfg) if strategy == "fsdp" else None
        if conflict:
            raise UserError(f"the accelerate config asks for FSDP, but {conflict}")
    if strategy == "fsdp" and not env.distributed:
        log.warning("--strategy fsdp in a single process: nothing to shard, the model trains whole")
        return "ddp"
    return strategy


def grad_compression(cfg: Config, env: DistEnv) -> GradCompression | None:
    """--grad-compress: the DDP hook, or None (none; or one process, where nothing is all-reduced)."""
    d = cfg.dist
    if d.grad_compress == "none":
        return None
    if not env.distributed:
        log.warning("--grad-compress %s in a single process: nothing is all-reduced, nothing to compress",
                    d.grad_compress)
        return None
    return GradCompression(d.grad_compress, d.powersgd_rank, d.powersgd_start_iter, d.powersgd_warm_start)


def shard_model(cfg: Config, model: nn.Module, precision: Precision, device: torch.device) -> nn.Module:
    """--strategy fsdp: FSDP2 over the backbone's blocks and the root (before the optimizer is built), with
    bf16 parameters/compute under --precision bf16 and fp32 gradient reduction unless --fsdp-bf16-reduce."""
    if cfg.dist.fsdp_cpu_offload and device.type != "cuda":
        raise UserError("--fsdp-cpu-offload moves a GPU run's shards and optimizer step to the CPU; this run is "
                        "on the CPU already: drop --fsdp-cpu-offload")
    bf16 = precision.name == "bf16"
    param_dtype = torch.bfloat16 if bf16 else None
    reduce_dtype = (torch.bfloat16 if cfg.dist.fsdp_bf16_reduce else torch.float32) if bf16 else None
    model = model.to(memory_format=torch.contiguous_format)  # shards are split along dim 0 of contiguous tensors
    return fsdp.shard(model, models.backbone_blocks(model, cfg.backbone.model), param_dtype, reduce_dtype,
                      cfg.dist.fsdp_cpu_offload)


def prepare(cfg: Config, groups: ProcessGroups, device: torch.device) -> tuple[RunParts, TrainState]:
    """Validate and build everything -- the run's parts and where it starts (the resumed checkpoint's
    `TrainState`, or the beginning) -- in the process groups `groups`; nothing is written to the output folder
    before this returns."""
    env = groups.env
    trackers.check_available(cfg.run.log_with)  # every rank, before anything is written
    fault_plan = faults.from_env()  # testing hooks: read here, once, not in the step or the writer
    precision = resolve(cfg.run.precision, env, device, cfg.run.fp16_init_scale)
    configure_backends(cfg.run.deterministic, precision)
    plan = run_folder.plan(cfg, groups, device)
    splits = datasets.load_splits_once(cfg, groups, plan.split_file)
    if cfg.data.cache_images is not None:  # decoded once per node (its first process), read by every rank
        d = cfg.data
        folder = image_cache.cache_folder(d.cache_images, plan.outdir)
        splits = groups.main_first(lambda first: image_cache.cache_splits(
            splits, folder, d.cache_size or d.image_size, first, d.image_decoder, device))
    if len(splits.classes) < 2:
        raise UserError(f"{cfg.data.data_dir} has {len(splits.classes)} class ({', '.join(splits.classes)}): a "
                        "classifier needs at least two (one class folder per class) -- it would reach a "
                        "meaningless 100%")
    # the ImageNet weights reach the hub cache once per node (rank 0 first), not once per rank at a time
    groups.main_first(lambda first: models.fetch_weights(cfg.backbone.model, cfg.backbone.weights) if first else None)
    # the layout the model and every batch share, decided once for the run
    memory_format = models.memory_format(device.type, cfg.backbone.mode)
    model, trainable = build_model(cfg, device, len(splits.classes), memory_format)
    sharded = resolve_strategy(cfg, env) == "fsdp"
    if sharded:
        model = shard_model(cfg, model, precision, device)
    compression = grad_compression(cfg, env)
    optimizer, group_rows = build_optimizer(cfg.optim, model, cfg.backbone.model, device,
                                            grad_scaler=precision.scales_loss)
    scaler = precision.grad_scaler()
    weights = (samplers.class_weights(splits.train.labels, len(splits.classes))
               if cfg.data.class_balance == "loss" else None)
    prep = preprocessing_of(cfg)  # the backbone's normalisation: loaders, cached features, config.json
    info = run_info(cfg, env, device, precision, splits.classes, table(group_rows), prep)
    if weights is not None:
        info = replace(info, class_weights=weights.tolist())
        log.info("class weights (inverse training frequency): %s",
                 ", ".join(f"{c}={w:.3f}" for c, w in zip(splits.classes, weights.tolist())))
    saving = cfg.checkpoint
    checkpointer = Checkpointer(plan.outdir, groups, device, every_steps=saving.checkpoint_every_steps,
                                every_minutes=saving.checkpoint_every_minutes, keep_last=saving.keep_last,
                                static_meta={"config": cfg.to_dict(), "num_classes": len(splits.classes),
                                             "world_size": env.world_size, "run": asdict(info)},
                                sharded=sharded, compression=compression, faults=fault_plan)
    ema = Ema(model, cfg.optim.ema_decay, cfg.optim.ema_every) if cfg.optim.ema_decay else None
    state = TrainState().on(device)
    if plan.resume_from is not None:
        state = checkpointer.restore(plan.resume_from, model, optimizer, scaler, ema)
    total, n_train = models.count_parameters(model)
    log.info("%s %s: %d params, %d trainable (%s)", cfg.backbone.model, cfg.backbone.mode, total, n_train,
             ", ".join(trainable) if len(trainable) <= 4 else f"{len(trainable)} tensors")
    log_groups(group_rows)
    train_loader, eval_loader = loaders.build_loaders(cfg, splits, env, device, torch.float32,
                                                   channels_last=memory_format == torch.channels_last, prep=prep)
    new_features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if cfg.data.cache_features:
        model, train_loader, eval_loader, new_features = use_cached_features(cfg, groups, device, model, splits,
                                                                             plan, precision, prep)
    mixer = mix.Mixer(cfg.optim, len(splits.classes), cfg.run.seed, env.rank) if mix.enabled(cfg.optim) else None
    trained = TrainedModel(model, env, device, cfg.run.compile, compression)
    parts = RunParts(cfg, groups, device, RunFolder(plan, groups), trained, optimizer, scaler, precision, train_loader,
                     eval_loader, splits, info, checkpointer,
                     new_features, None if weights is None else weights.float().to(device), ema, mixer,
                     hooks_for(cfg), fault_plan)
    return parts, state


def use_cached_features(cfg: Config, groups: ProcessGroups, device: torch.device, model: nn.Module, splits: Splits,
                        plan: run_folder.RunPlan, precision: Precision, prep: Preprocessing
                        ) -> tuple[nn.Module, BatchLoader, BatchLoader, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Replace the image loaders by feature loaders and the model by its head (see `dtl.data.features`)."""
    env = groups.env
    head = models.head_name(model)
    if not isinstance(model.get_submodule(head), nn.Linear):
        # SqueezeNet classifies with a 1x1 convolution followed by ReLU and pooling inside forward():
        # running the head alone on cached features would skip them
        raise UserError(f"--cache-features needs a model whose last step is its Linear classification layer; "
                        f"{cfg.backbone.model}'s head ({head}) is a convolution followed by pooling: drop "
                        "--cache-features for it")
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        log.warning("--cache-features computes features with dropout off (eval mode); the uncached run keeps "
                    "the backbone's dropout active: pass --dropout 0 to compare the two")
    found, new = {}, {}
    for name, split in (("train", splits.train), ("test", splits.test)):
        hit = features.cached(plan.outdir, cfg, name, len(split), device)
        if hit is None:
            loader = loaders.eval_loader(cfg, split, env, device, prep=prep)
            hit = new[name] = features.extract(model, head, loader, groups, precision.autocast)
        found[name] = hit
    log.info("cached features: train %s, test %s (%s)", tuple(found["train"][0].shape),
             tuple(found["test"][0].shape), "computed" if new else f"reused from {plan.outdir / 'features'}")
    sampler = samplers.sampler_for(splits.train.labels, env, cfg.run.seed, cfg.data.class_balance,
                                   cfg.optim.batch_size)
    train = features.FeatureLoader(*found["train"], sampler,
                                   cfg.optim.batch_size)
    test = features.FeatureLoader(*found["test"],
                                  samplers.EvalShardSampler(len(splits.test), env.rank, env.world_size),
                                  cfg.optim.batch_size)
    return features.FeatureHead(model, head), train, test, new
