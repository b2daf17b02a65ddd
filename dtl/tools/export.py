"""`dtl export`: a trained checkpoint as ONNX, TorchScript or a plain safetensors state dict, verified.

Every format is written to a temporary name, checked against the PyTorch model on a batch of real inputs (the
first `VERIFY_IMAGES` images of the run's test split, preprocessed exactly as the run evaluated them; a seeded
batch of random images through the same transform only when that data is unavailable, which the output says),
and only then renamed into place: a failed check leaves no file and exits 1. The check: the largest absolute
difference of the logits must be at most ``TOLERANCE x max(1, max |logit|)``, on the verification batch and on
a smaller batch (the batch axis is dynamic).

- onnx: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript; the TorchScript-based exporter is
  deprecated and cannot export VGG's adaptive pooling at small sizes), opset `OPSET`, dynamic batch axis,
  input ``input`` (N, 3, H, W) float32, output ``logits``; checked with onnxruntime (CPU).
- torchscript: `torch.jit.trace` (deprecated by torch in favour of torch.export, still working in torch 2.x;
  the output says so); checked with `torch.jit.load`.
- safetensors: the state dict with the architecture's own key names (timm or torchvision); checked by
  loading it into a freshly built model.

Next to the file: ``preprocessing.json`` (size, resize, crop, mean, std, interpolation, class names) and a
model card ``README.md`` (source run, data set, metrics, the training settings as a command line).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtl import atomic_files, models
from dtl.config import Config
from dtl.data import datasets, folder, loaders
from dtl.data.preprocessing import eval_transform
from dtl.data.split_file import SPLIT_FILE
from dtl.distributed import DistEnv
from dtl.errors import EXIT_FAILURE, EXIT_OK, UserError
from dtl.tools.eval_run import Loaded, load_model
from dtl.train.checkpoint import format as ckpt
from dtl.train.metrics import read_metrics

log = logging.getLogger("dtl")

FORMATS = ("onnx", "torchscript", "safetensors")
OPSET = 18
#: max |logit difference| allowed, relative to the logits' scale (max(1, max |logit|))
TOLERANCE = 1e-4
VERIFY_IMAGES = 8
_SMALL_BATCH = 3
_CPU = torch.device("cpu")


class ExportError(Exception):
    """The exported file failed its check or could not be written (exit 1, nothing left behind)."""


def _require_onnx() -> Any:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - torch's dynamo exporter needs it
    except ImportError as err:
        raise UserError(f"--format onnx needs onnx, onnxruntime and onnxscript ({err.name} is missing): "
                        "pip install 'dtl[onnx]'") from None
    return onnxruntime


# ---- the model and the inputs ---------------------------------------------------------------------

def use_ema(loaded: Loaded, checkpoint_arg: Path) -> str:
    """Put the EMA weights into `loaded.model`: a run folder's model_ema.safetensors, else the checkpoint's
    ema.safetensors. Returns the file used."""
    candidates = [loaded.checkpoint / "ema.safetensors"]
    if loaded.run_dir is not None and checkpoint_arg.resolve() == loaded.run_dir.resolve():
        candidates.insert(0, loaded.run_dir / "model_ema.safetensors")
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise UserError(f"--ema: {checkpoint_arg} has no EMA weights ({' or '.join(map(str, candidates))}); the run "
                        "was trained without --ema-decay: export without --ema")
    state = {**loaded.model.state_dict(), **atomic_files.read_tensors(found)}
    models.load_into(loaded.model, state, f"--ema {found}")
    return str(found)


def verification_batch(loaded: Loaded) -> tuple[torch.Tensor, str]:
    """(images, where they come from): the run's first test images with its eval transform, else a seeded
    batch of random uint8 images through the same transform."""
    cfg = loaded.config
    size = cfg.data.image_size
    try:
        cfg = cfg.replace(eval_subset=VERIFY_IMAGES, train_subset=VERIFY_IMAGES, batch_size=VERIFY_IMAGES,
                          num_workers=0, download=False, resume=None, output_dir=None, debug=False, device="cpu")
        if cfg.data.dataset == "folder":  # the held-out images only (the run's split.json), not the train set
            cfg = cfg.replace(data_pipeline="workers")
            saved = loaded.run_dir / SPLIT_FILE if loaded.run_dir is not None else None
            test = folder.load_folder_splits(cfg, saved, with_train=False, is_main=False).test
        else:
            test = datasets.load_splits(cfg, allow_download=False, is_main=False).test
        test = test.subset(VERIFY_IMAGES, "first", 0)
        loader = loaders.eval_loader(cfg, test, DistEnv(), _CPU, channels_last=False, prep=loaded.preprocessing)
        images, _ = next(iter(loader))
        return images.float().contiguous(), f"{len(images)} images of the run's {cfg.data.dataset} test split"
    except (UserError, OSError, ValueError, RuntimeError, StopIteration) as err:
        why = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        gen = torch.Generator().manual_seed(0)
        raw = torch.randint(0, 256, (VERIFY_IMAGES, 3, size, size), dtype=torch.uint8, generator=gen)
        images = eval_transform(size, loaded.preprocessing)(raw)
        return images.contiguous(), (f"a synthetic batch ({VERIFY_IMAGES} seeded random images through the eval "
                                     f"transform; the run's test data is unavailable: {why})")


# ---- writers and checks -----------------------------------------------------------------------------

def _write_onnx(model: nn.Module, path: Path, batch: torch.Tensor) -> None:
    _require_onnx()
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress lines and its internal deprecations
        torch.onnx.export(model, (batch,), str(path), dynamo=True, opset_version=OPSET, input_names=["input"],
                          output_names=["logits"], dynamic_shapes=({0: batch_dim},), external_data=False)


def _run_onnx(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    ort = _require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _write_torchscript(model: nn.Module, path: Path, batch: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.jit.trace is deprecated" and tracer notes: said once, below
        torch.jit.save(torch.jit.trace(model, batch), str(path))


def _run_torchscript(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(path), map_location="cpu")
    return scripted


def _write_safetensors(model: nn.Module, path: Path, batch: torch.Tensor) -> None:
    atomic_files.write_tensors(path, model.state_dict())


def _safetensors_runner(loaded: Loaded) -> Callable[[Path], Callable[[torch.Tensor], torch.Tensor]]:
    def run(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
        cfg = loaded.config
        fresh = models.build_model(cfg.backbone.model, len(loaded.classes), "none", cfg.data.image_size)
        models.load_into(fresh, atomic_files.read_tensors(path), f"exported {path}")
        return fresh.eval()
    return run


def max_difference(reference: Callable[[torch.Tensor], torch.Tensor], exported: Callable[[torch.Tensor], torch.Tensor],
                   batch: torch.Tensor) -> tuple[float, float]:
    """(largest |logit difference| over the batch and a smaller one, the allowed difference)."""
    worst, scale = 0.0, 1.0
    with torch.no_grad():
        for x in (batch, batch[:_SMALL_BATCH]):
            ref, out = reference(x).float(), exported(x).float()
            if out.shape != ref.shape:
                raise ExportError(f"the exported model gives shape {tuple(out.shape)} for a batch of {len(x)}, "
                                  f"PyTorch {tuple(ref.shape)}")
            worst = max(worst, (out - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    return worst, TOLERANCE * scale


def write_verified(fmt: str, model: nn.Module, output: Path, batch: torch.Tensor,
                   loaded: Loaded) -> tuple[float, float]:
    """Write `fmt` to a temporary name next to `output`, check it, rename it into place; (diff, tolerance)."""
    writers = {"onnx": (_write_onnx, _run_onnx), "torchscript": (_write_torchscript, _run_torchscript),
               "safetensors": (_write_safetensors, _safetensors_runner(loaded))}
    write, runner = writers[fmt]
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        try:
            write(model, tmp, batch)
            diff, tol = max_difference(model, runner(tmp), batch)
        except (UserError, ExportError):
            raise
        except Exception as err:  # noqa: BLE001 - any exporter/runtime failure: one message, exit 1
            raise ExportError(f"{fmt} export failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
        if not diff <= tol:  # also catches NaN
            raise ExportError(f"{fmt} export does not match PyTorch: max |logit difference| {diff:.3g} > tolerance "
                              f"{tol:.3g}; nothing written")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return diff, tol


# ---- what goes next to the file --------------------------------------------------------------------

def preprocessing_record(loaded: Loaded, fmt: str, output: Path) -> dict[str, Any]:
    size = loaded.config.data.image_size
    prep = loaded.preprocessing
    return {"file": output.name, "format": fmt, "model": loaded.config.backbone.model,
            "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "channels": "RGB",
                      "values": "uint8 / 255, then (x - mean) / std"},
            "size": size, "resize": size, "crop": size, "interpolation": prep.interpolation,
            "mean": list(prep.mean), "std": list(prep.std), "classes": loaded.classes,
            **({"opset": OPSET} if fmt == "onnx" else {})}


def command_line(cfg: Config) -> str:
    """`dtl train` with the settings that differ from the defaults (run-only ones left out)."""
    defaults = Config(mode=cfg.backbone.mode, recipe=cfg.run.recipe).to_dict()
    flags = ["dtl train", f"--model {cfg.backbone.model}", f"--mode {cfg.backbone.mode}"]
    for key, value in cfg.to_dict().items():
        if key in ("model", "mode", "resume", "overwrite") or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif value is not None:
            flags.append(f"{flag} {value}")
    return " ".join(flags)


def model_card(loaded: Loaded, fmt: str, output: Path, check: dict[str, Any]) -> str:
    cfg, meta = loaded.config, loaded.meta
    run = loaded.run_dir
    rows = read_metrics(run) if run is not None else []
    best_file = (run / ckpt.CKPT_DIR / "best.json") if run is not None else None
    best = json.loads(best_file.read_text()) if best_file is not None and best_file.is_file() else None
    last = rows[-1] if rows else {}
    metrics = [f"- checkpoint {loaded.checkpoint.name}: epoch {(meta.get('progress') or {}).get('epoch')}, "
               f"global step {meta.get('global_step')}"]
    if best:
        metrics.append(f"- best checkpoint (checkpoints/best.json): {best.get('checkpoint')}, test accuracy "
                       f"{best.get('test_acc')} ({best.get('source', 'raw')} weights)")
    if last:
        metrics.append("- last epoch (metrics.jsonl): " + ", ".join(
            f"{k} {last[k]:.4g}" if isinstance(last[k], float) else f"{k} {last[k]}"
            for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_acc_ema") if k in last))
    prep = loaded.preprocessing
    return "\n".join([
        f"# {cfg.backbone.model} ({cfg.backbone.mode}) for {len(loaded.classes)} classes",
        "",
        f"Exported by `dtl export --format {fmt}` from {run or loaded.checkpoint} ({check['weights']} weights).",
        "",
        "## Data", "",
        f"- data set: {cfg.data.dataset}" + (f" ({cfg.data.data_dir})" if cfg.data.dataset != "synthetic" else ""),
        f"- classes: {', '.join(loaded.classes[:50])}{' ...' if len(loaded.classes) > 50 else ''}",
        "",
        "## Metrics", "", *metrics, "",
        "## Input (preprocessing.json)", "",
        f"RGB, Resize({cfg.data.image_size}, {prep.interpolation}, antialias) + CenterCrop({cfg.data.image_size}), "
        f"scaled to [0, 1], normalised with mean {list(prep.mean)} and std {list(prep.std)}; NCHW float32.",
        "",
        "## Check", "",
        f"{output.name}: max |logit difference| to PyTorch {check['diff']:.3g} (tolerance {check['tol']:.3g} = "
        f"{TOLERANCE:g} x max(1, max |logit|)) on {check['source']}, and on a batch of {_SMALL_BATCH}.",
        "",
        "## Training", "",
        "```", command_line(cfg), "```", "",
        f"Launcher {(meta.get('run') or {}).get('launcher')}, world size {meta.get('world_size')}, versions "
        f"{json.dumps((meta.get('run') or {}).get('versions', {}))}.",
        "",
    ])


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- dtl export -------------------------------------------------------------------------------------

def run_export(args: argparse.Namespace) -> int:
    """`dtl export`: the exit code (0 done, 1 the check failed, UserError -> 2)."""
    if args.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.format == "onnx":
        _require_onnx()  # before anything slow
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"--output {output} is a folder: give a file name (e.g. {output / ('model.' + args.format)})")
    loaded = load_model(args.checkpoint, _CPU)
    weights = use_ema(loaded, Path(args.checkpoint)) if args.ema else str(loaded.checkpoint / "model.safetensors")
    model = loaded.model.to(memory_format=torch.contiguous_format).float().eval()
    batch, source = verification_batch(loaded)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        diff, tol = write_verified(args.format, model, output, batch, loaded)
    except ExportError as err:
        log.error("error: %s", err)
        return EXIT_FAILURE
    except OSError as err:
        raise UserError(f"cannot write {output}: {err}") from None
    check = {"diff": diff, "tol": tol, "source": source, "weights": f"EMA ({weights})" if args.ema else "raw"}
    atomic_files.write_json(output.parent / "preprocessing.json", preprocessing_record(loaded, args.format, output))
    _write_text(output.parent / "README.md", model_card(loaded, args.format, output, check))
    if args.format == "torchscript":
        log.warning("TorchScript (torch.jit.trace) is deprecated by PyTorch in favour of torch.export; the file "
                    "loads with torch.jit.load in current releases")
    print(f"wrote {output} ({args.format}{f', opset {OPSET}' if args.format == 'onnx' else ''}) from "
          f"{loaded.checkpoint} [{check['weights']} weights]")
    print(f"verified on {source}: max |logit difference| {diff:.3g} <= tolerance {tol:.3g}")
    print(f"wrote {output.parent / 'preprocessing.json'} and {output.parent / 'README.md'}")
    return EXIT_OK
