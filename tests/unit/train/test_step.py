"""dtl.train.step: the optimizer step (finite check, skip policy, fp16 overflow counting, clipping), micro-steps
and the non-finite record, on a real tiny run built by dtl.train.build."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from torch import nn

from dtl import distributed
from dtl.config.loading import config_from_flags
from dtl.data.augment import mix
from dtl.distributed import ProcessGroups
from dtl.errors import NonFiniteLossError
from dtl.train import loop, step
from dtl.train.build import prepare
from dtl.train.loss import SoftTargetCrossEntropy, criterion_for
from dtl.train.metrics import Meter
from dtl.train.parts import RunParts
from dtl.train.train_state import TrainState
from tests.conftest import TINY, free_port, train_inproc


def tiny_run(tmp_path, *flags: str) -> tuple[RunParts, TrainState]:
    cfg = config_from_flags([*TINY, "--train-subset", "32", "--eval-subset", "16", "--output-dir",
                             str(tmp_path / "run"), *flags])
    return prepare(cfg, ProcessGroups(), torch.device("cpu"))


def backward(parts: RunParts, poison: bool = False) -> list[torch.Tensor]:
    """One backward pass; the step's losses, as `step.optimizer_step` takes them."""
    images, labels = next(iter(parts.train_loader))
    loss = nn.functional.cross_entropy(parts.model.wrapped(images), labels)
    if poison:
        loss = loss * float("nan")
    loss.backward()
    return [loss.detach()]


def params(parts: RunParts) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parts.model.wrapped.parameters()]


def test_a_finite_step_updates_and_clears_the_gradients(tmp_path):
    parts, state = tiny_run(tmp_path)
    before, bad = params(parts), step.NonFiniteSteps()
    step.optimizer_step(parts, state, bad, backward(parts))
    assert bad.first() is None and all(p.grad is None for p in parts.model.wrapped.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, params(parts)))
    assert parts.optimizer.param_groups[0]["lr"] == parts.cfg.optim.lr


def test_abort_policy_remembers_the_first_bad_step_and_the_sync_point_raises(tmp_path):
    parts, state = tiny_run(tmp_path)
    state.global_step = 5
    bad = step.NonFiniteSteps()
    step.optimizer_step(parts, state, bad, backward(parts, poison=True))
    state.global_step = 6
    step.optimizer_step(parts, state, bad, backward(parts, poison=True))
    with pytest.raises(NonFiniteLossError, match="global step 5.*a fresh run"):
        loop.sync_point(parts, state, bad)


def test_skip_policy_drops_the_update(tmp_path):
    parts, state = tiny_run(tmp_path, "--nan-policy", "skip", "--max-nan-skips", "1")
    before, bad = params(parts), step.NonFiniteSteps()
    step.optimizer_step(parts, state, bad, backward(parts, poison=True))
    assert all(torch.equal(a, b) for a, b in zip(before, params(parts)))
    assert (state.nan_skips, state.nan_skips_total) == (1, 1)
    with pytest.raises(NonFiniteLossError, match="2 non-finite steps in a row"):
        step.optimizer_step(parts, state, bad, backward(parts, poison=True))


def test_fp16_overflows_are_counted_on_the_device_and_read_at_the_sync_point(tmp_path):
    parts, state = tiny_run(tmp_path, "--precision", "fp16", "--fp16-init-scale", "1e38")
    bad = step.NonFiniteSteps()
    images, labels = next(iter(parts.train_loader))
    meter = Meter(parts.device)
    loss = step.forward_backward(parts, state, images, labels, nn.CrossEntropyLoss(), meter)
    step.optimizer_step(parts, state, bad, [loss])
    assert int(state.overflows) == 1 and parts.scaler.get_scale() < 1e38
    loop.sync_point(parts, state, bad)
    assert state.overflow_skips == 1 and int(state.overflows) == 0


def test_train_step_accumulates_micro_batches_into_one_optimizer_step(tmp_path):
    parts, state = tiny_run(tmp_path, "--grad-accum", "2")
    batches = list(parts.train_loader)[:2]
    stats = step.train_step(parts, state, batches, nn.CrossEntropyLoss(), Meter(parts.device), step.NonFiniteSteps())
    assert stats.images == sum(len(y) for _, y in batches) and bool(stats.loss_finite)
    assert state.global_step == 1


def test_compiled_ddp_skips_the_all_reduce_on_accumulation_micro_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("DTL_FORCE_DISTRIBUTED", "1")  # a real (one-rank, gloo) group and DDP wrapper
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    calls: list[int] = []
    per_micro_step: list[tuple[bool, int]] = []

    original_init = nn.parallel.DistributedDataParallel.__init__

    def init_with_hook(self, *args, **kwargs):
        original_init(self, *args, **kwargs)

        def counting_hook(state, bucket):
            calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        self.register_comm_hook(None, counting_hook)

    original_fb = step.forward_backward

    def recording_fb(parts, state, images, labels, criterion, meter, sync=True, **kwargs):
        before = len(calls)
        assert distributed.ddp_of(parts.model.wrapped) is not None, "the model should be DDP under compile"
        loss = original_fb(parts, state, images, labels, criterion, meter, sync=sync, **kwargs)
        per_micro_step.append((sync, len(calls) - before))
        return loss

    monkeypatch.setattr(nn.parallel.DistributedDataParallel, "__init__", init_with_hook)
    monkeypatch.setattr(step, "forward_backward", recording_fb)
    try:
        code = train_inproc(*TINY, "--compile", "--grad-accum", "4", "--train-subset", "128", "--eval-subset",
                            "32", "--epochs", "1", "--output-dir", str(tmp_path / "run"))
    finally:
        distributed.teardown()
    assert code == 0
    assert [s for s, _ in per_micro_step] == [False, False, False, True] * 2
    assert all(n == 0 for s, n in per_micro_step if not s)  # accumulation: no all-reduce
    assert all(n > 0 for s, n in per_micro_step if s)


def test_clipping_bounds_the_global_norm_once_per_optimizer_step(tmp_path, monkeypatch):
    post_clip, calls = [], []
    original = step.clip_gradients

    def spy(grads, norms, max_norm, stats):
        original(grads, norms, max_norm, stats)
        calls.append(max_norm)
        post_clip.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    monkeypatch.setattr(step, "clip_gradients", spy)
    out = tmp_path / "run"
    assert train_inproc(*TINY, "--train-subset", "128", "--eval-subset", "16", "--batch-size", "8", "--lr", "5",
                        "--grad-accum", "4", "--clip-grad-norm", "1.0", "--epochs", "1", "--output-dir", str(out)) == 0
    assert len(calls) == 128 // (8 * 4)  # 16 micro-batches, 4 optimizer steps: one clip each
    assert all(n <= 1.0 + 1e-4 for n in post_clip), post_clip
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["grad_norm_max"] >= row["grad_norm_mean"] > 0


def test_mixing_happens_in_the_step_seeded_by_each_micro_batchs_index(tmp_path, monkeypatch):
    parts, state = tiny_run(tmp_path, "--grad-accum", "2", "--mixup", "0.2", "--cutmix", "1.0", "--batch-size", "8")
    assert isinstance(criterion_for(parts.cfg.optim, None), SoftTargetCrossEntropy)
    seen, fed = [], []
    original = parts.mixer.__call__

    def recording(images, labels, epoch, batch_index):
        seen.append((epoch, batch_index))
        return original(images, labels, epoch, batch_index)

    parts = dataclasses.replace(parts, mixer=recording)
    handle = parts.model.wrapped.register_forward_pre_hook(lambda module, args: fed.append(args[0].clone()))
    batches = list(parts.train_loader)[:2]
    state.epoch = 1
    step.train_step(parts, state, batches, SoftTargetCrossEntropy(), Meter(parts.device), step.NonFiniteSteps(),
                    first_batch=2)
    handle.remove()
    assert seen == [(1, 2), (1, 3)]
    for (images, labels), got, b in zip(batches, fed, (2, 3)):
        assert torch.equal(got, mix.Mixer(parts.cfg.optim, 10, parts.cfg.run.seed, 0)(images, labels, 1, b).images)
    assert tiny_run(tmp_path / "off", "--mixup", "0", "--cutmix", "0")[0].mixer is None  # off: today's step


def test_the_non_finite_record_names_the_first_bad_step_and_forgets_what_it_checked():
    record = step.NonFiniteSteps()
    finite, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    record.note(3, [finite, finite])
    record.note(4, [finite, torch.tensor(float("inf")), finite])
    record.note(5, [nan])
    assert record.first() == 4 and record.first() is None  # checked once, then forgotten
    record.note(6, [finite])
    assert record.first() is None
    record.COMPACT_AT = 3  # reduced to flags along the way: the same answer
    for i in range(10):
        record.note(i, [finite, nan if i in (7, 9) else finite])
    assert record.first() == 7
