"""The CUDA/NCCL path's mechanisms, reproduced on the CPU: optimizer-state layout on resume, fp16 loss-scale
overflows, the precision choice, GPU binding, the stop-flag agreement, DDP under torch.compile, determinism,
and rank-0-first downloads."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from dtl import checkpoint as ckpt
from dtl import dist, engine, models
from dtl.config import Config
from dtl.errors import UserError

from .conftest import PY, ROOT, TINY, free_port, train_inproc

# ---- 1. optimizer state keeps the parameters' memory format across a resume ---------------------------

def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    net(torch.zeros(1, 3, 8, 8))
    return net.to(memory_format=torch.channels_last)


def _step(net: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(4, 3, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    loss = net(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_resume_with_channels_last_and_fused_optimizer_is_bitwise(kind, tmp_path):
    def make(net: nn.Module) -> torch.optim.Optimizer:
        if kind == "sgd":
            return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=True)
        return torch.optim.AdamW(net.parameters(), lr=0.01, fused=True)

    ref = _conv_net()
    ref_opt = make(ref)
    for i in range(6):
        _step(ref, ref_opt, i)

    net = _conv_net()
    opt = make(net)
    for i in range(3):
        _step(net, opt, i)
    # through the checkpoint format: tensors are written contiguous (NCHW)
    tensors, extra = ckpt.optimizer_to_tensors(opt.state_dict())
    ckpt.write_tensors(tmp_path / "optim.safetensors", tensors)
    model_state = {k: v.clone() for k, v in net.state_dict().items()}
    state = ckpt.optimizer_from_tensors(ckpt.read_tensors(tmp_path / "optim.safetensors"), extra)

    resumed = _conv_net()
    resumed.load_state_dict(model_state)
    resumed_opt = make(resumed)
    engine.load_optimizer_state(resumed_opt, state)
    for p in resumed.parameters():
        for value in resumed_opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert value.stride() == p.stride()
    for i in range(3, 6):
        _step(resumed, resumed_opt, i)
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ---- 2. fp16: loss-scale overflows are skipped steps, not errors ---------------------------------------

FP16 = [*TINY, "--precision", "fp16", "--train-subset", "48", "--eval-subset", "16", "--epochs", "1"]


def test_fp16_overflow_steps_are_skipped_and_the_scale_shrinks(tmp_path):
    out = tmp_path / "run"
    assert train_inproc(*FP16, "--fp16-init-scale", "1e38", "--output-dir", str(out)) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["overflow_skips"] >= 1
    assert row["loss_scale"] < 1e38
    assert json.loads((out / "status.json").read_text())["state"] == "completed"


def test_fp16_real_nan_loss_still_aborts(tmp_path, capfd):
    out = tmp_path / "run"
    code = train_inproc(*FP16, "--fault-step", "1", "--fault-kind", "nan", "--output-dir", str(out))
    assert code == 1
    assert "non-finite loss at global step 1" in capfd.readouterr().err


# ---- 3. precision: bf16 only where the GPU has it; accelerate's default "no" is not a choice -----------

@pytest.mark.parametrize("hardware_bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_ignores_emulated_bf16(monkeypatch, hardware_bf16, expected):
    # V100/T4: is_bf16_supported() is True by default (emulation), False with including_emulation=False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or hardware_bf16)
    cuda = torch.device("cuda", 0)
    assert engine.resolve_precision(Config(precision="auto"), dist.DistEnv(), cuda)[0] == expected


def test_accelerate_default_no_is_auto_and_explicit_choices_win(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    no = dist.DistEnv(accelerate_mixed_precision="no")
    precision, why = engine.resolve_precision(Config(precision="auto"), no, cuda)
    assert precision == "bf16" and "not a choice" in why, why
    assert engine.resolve_precision(Config(precision="auto"), no, cpu)[0] == "fp32"
    fp16 = dist.DistEnv(accelerate_mixed_precision="fp16")
    assert engine.resolve_precision(Config(precision="auto"), fp16, cuda)[0] == "fp16"
    assert engine.resolve_precision(Config(precision="fp32"), fp16, cuda) == ("fp32", "--precision flag")


# ---- 4. which GPU a process uses -----------------------------------------------------------------------

@pytest.mark.parametrize("local_rank, local_world, visible, per_task, expected", [
    (0, 4, 4, None, 0), (3, 4, 4, None, 3),      # one process per GPU, all GPUs visible
    (3, 4, 1, None, 0), (2, 4, 1, 1, 0),         # --gpus-per-task=1 / --gpu-bind: each task sees one
    (3, 4, 2, 2, 1), (2, 4, 2, 2, 0),            # each task bound to its own pair
])
def test_gpu_index(local_rank, local_world, visible, per_task, expected):
    env = dist.DistEnv(local_rank=local_rank, local_world_size=local_world, world_size=local_world,
                       gpus_per_task=per_task)
    assert dist.gpu_index(env, visible) == expected


def test_gpu_index_refuses_two_processes_on_one_gpu():
    env = dist.DistEnv(local_rank=3, local_world_size=4, world_size=4)
    with pytest.raises(UserError, match="local rank 3 has no GPU of its own: this process sees 2 GPU"):
        dist.gpu_index(env, 2)


def test_slurm_gpus_per_task_and_forced_group_are_read():
    env = dist.detect(environ={"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "2",
                               "SLURM_JOB_ID": "7", "SLURM_GPUS_PER_TASK": "1", "MASTER_ADDR": "h"})
    assert env.gpus_per_task == 1 and env.master_port == 20007
    forced = dist.detect(environ={"RANK": "0", "WORLD_SIZE": "1", "DTL_FORCE_DISTRIBUTED": "1"})
    assert forced.distributed and forced.world_size == 1
    assert not dist.detect(environ={"RANK": "0", "WORLD_SIZE": "1"}).distributed


# ---- 5. stop-flag agreement and rank-0-first work, on two real gloo processes ---------------------------

def _two_ranks(rank: int, port: int, out: str, job: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    env = dist.DistEnv(rank=rank, local_rank=rank, world_size=2, local_world_size=2, launcher="torchrun")
    dist.setup(env, torch.device("cpu"), timeout_s=20)
    result: dict = {}
    try:
        if job == "agreement":
            agreement = dist.Agreement(env)
            for step in range(8):
                flag = rank == 1 and step >= 3  # rank 1 alone sees the signal, from step 3 on
                if agreement.step(flag, False)[0]:
                    result["stopped_at"] = step
                    break
            agreement.drain()
        elif job == "order":
            marker = Path(out) / "first"

            def work(first: bool) -> bool:
                if rank == 0:
                    import time

                    time.sleep(1.0)  # slow rank-0 I/O: the other must wait for it, not race it
                    marker.write_text("0")
                return marker.exists()

            result["saw_rank0_result"] = dist.main_first(env, work)
        elif job == "failure":
            def fail(first: bool) -> None:
                if rank == 0:
                    raise UserError("no data here")

            try:
                dist.main_first(env, fail, timeout_s=20)
            except UserError as err:
                result["error"] = str(err)
    finally:
        dist.teardown()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def _spawn(job: str, tmp_path: Path) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(free_port(), str(tmp_path), job), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_agreement_stops_every_rank_at_the_same_step(tmp_path):
    results = _spawn("agreement", tmp_path)
    assert results[0]["stopped_at"] == results[1]["stopped_at"] == 4  # raised at 3, agreed one step later


def test_main_first_runs_rank0_before_the_others(tmp_path):
    results = _spawn("order", tmp_path)
    assert results[1]["saw_rank0_result"] is True


def test_main_first_failure_stops_every_rank_without_a_hang(tmp_path):
    results = _spawn("failure", tmp_path)
    assert results[0]["error"] == "no data here"
    assert "another rank failed" in results[1]["error"]


def test_control_group_gets_the_dist_timeout(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist.tdist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(dist.tdist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist.tdist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist.tdist, "new_group", lambda **k: seen.update(k))
    try:
        dist.setup(dist.DistEnv(world_size=2, launcher="torchrun"), torch.device("cpu"), 42)
    finally:
        dist._CONTROL_GROUP = None
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 42


def test_weights_are_fetched_once_not_by_every_rank(tmp_path):
    """Offline, two ranks: one download attempt (rank 0's), one error message, exit non-zero, no hang."""
    attempts = tmp_path / "attempts.txt"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, urllib.error\n"
        "import torch.hub\n"
        "def _offline(url, dst, *args, **kwargs):\n"
        f"    with open({str(attempts)!r}, 'a') as f:\n"
        "        f.write(os.environ.get('RANK', '?') + '\\n')\n"
        "    raise urllib.error.URLError('offline (test)')\n"
        "torch.hub.download_url_to_file = _offline\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCH_HOME": str(tmp_path / "th"),
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--dataset", "synthetic", "--image-size", "32", "--device", "cpu", "--model", "squeezenet1_1",
           "--mode", "transfer", "--epochs", "1", "--output-dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert attempts.read_text().split() == ["0"], done.stderr[-3000:]
    assert done.stderr.count("could not get the pretrained weights") == 1
    assert not (tmp_path / "run").exists()


# ---- 6. DDP under torch.compile: no_sync on accumulation micro-steps, eval without DDP ------------------

def test_unwrap_helpers_see_through_compile():
    net = nn.Linear(2, 2)
    compiled = torch.compile(net, backend="eager")
    assert dist.local_module(compiled) is net and dist.unwrap(compiled) is net
    assert dist.ddp_of(compiled) is None


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

    original_fb = engine.forward_backward

    def recording_fb(run, images, labels, criterion, meter, sync=True):
        before = len(calls)
        assert dist.ddp_of(run.model) is not None, "the model should be DDP under compile"
        finite = original_fb(run, images, labels, criterion, meter, sync=sync)
        per_micro_step.append((sync, len(calls) - before))
        return finite

    monkeypatch.setattr(nn.parallel.DistributedDataParallel, "__init__", init_with_hook)
    monkeypatch.setattr(engine, "forward_backward", recording_fb)
    try:
        code = train_inproc(*TINY, "--compile", "--grad-accum", "4", "--train-subset", "128", "--eval-subset",
                            "32", "--epochs", "1", "--output-dir", str(tmp_path / "run"))
    finally:
        dist.teardown()
    assert code == 0
    assert [s for s, _ in per_micro_step] == [False, False, False, True] * 2
    assert all(n == 0 for s, n in per_micro_step if not s)  # accumulation: no all-reduce
    assert all(n > 0 for s, n in per_micro_step if s)


# ---- 7. determinism ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size_in, size_out", [(7, 7), (14, 7), (1, 7), (8, 1), (5, (1, 1))])
def test_deterministic_pooling_matches_adaptive_pooling(size_in, size_out):
    x = torch.randn(2, 3, size_in, size_in, requires_grad=True)
    ref = nn.AdaptiveAvgPool2d(size_out)(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    out = models.DeterministicAdaptiveAvgPool2d(size_out)(x)
    (g_out,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g_out, g_ref)


def test_deterministic_pooling_swaps_classifier_pools_and_keeps_state_dict():
    for name in ("vgg16", "resnet18"):
        net = models.skeleton(name)
        keys = list(net.state_dict())
        assert models.deterministic_pooling(net) == 1
        assert list(net.state_dict()) == keys
        wrapped = {id(m.pool) for m in net.modules() if isinstance(m, models.DeterministicAdaptiveAvgPool2d)}
        assert all(id(m) in wrapped for m in net.modules() if type(m) is nn.AdaptiveAvgPool2d)


def test_deterministic_flag_sets_strict_mode_and_cublas_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        assert train_inproc(*TINY, "--deterministic", "--train-subset", "32", "--eval-subset", "16",
                            "--epochs", "1", "--output-dir", str(tmp_path / "run")) == 0
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_an_op_without_deterministic_kernel_is_one_clear_message(caplog):
    def body(device):
        raise RuntimeError("adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation, but "
                           "you set 'torch.use_deterministic_algorithms(True)'. You can turn off determinism ...")

    dist.setup_logging(dist.DistEnv())
    logging.getLogger("dtl").propagate = True
    with caplog.at_level(logging.ERROR, logger="dtl"):
        code = dist.run_guarded(dist.DistEnv(), "cpu", 10, body)
    assert code == 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "adaptive_avg_pool2d_backward_cuda" in messages[0]
    assert "without --deterministic" in messages[0]


# ---- on a GPU only (make gpu-check runs these with -m cuda) ------------------------------------------------

@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_optimizer_resumes_with_channels_last(kind):
    net = _conv_net().cuda()
    make = (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, fused=True)) if kind == "sgd" else (
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, fused=True))
    opt = make(net)
    x = torch.randn(4, 3, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    net(x).square().mean().backward()
    opt.step()
    tensors, extra = ckpt.optimizer_to_tensors(opt.state_dict())
    state = ckpt.optimizer_from_tensors({k: v.cpu().contiguous() for k, v in tensors.items()}, extra)
    resumed_opt = make(net)
    engine.load_optimizer_state(resumed_opt, state)
    net(x).square().mean().backward()
    resumed_opt.step()  # raised "strides do not match" before the fix
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_deterministic_backward_through_swapped_pooling_is_bitwise():
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            torch.manual_seed(0)
            net = torchvision.models.resnet18(num_classes=10).cuda()
            models.deterministic_pooling(net)
            torch.manual_seed(1)
            x = torch.randn(8, 3, 32, 32, device="cuda")
            net(x).sum().backward()  # without the swap: adaptive_avg_pool2d_backward_cuda raises here
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        assert torch.equal(grads[0], grads[1])
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_confusion_matrix_needs_no_host_sync():
    from dtl.inference import evaluate_confusion

    labels = torch.randint(0, 10, (64,), device="cuda")
    batches = [(torch.randn(64, 10, device="cuda"), labels)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            totals_model = nn.Identity().cuda()
            # only the final all-reduce/.tolist() may sync: run the per-batch part under the sync guard
            classes = torch.arange(10, device="cuda")
            for logits, y in batches:
                pred = logits.argmax(1)
                ((y[:, None] == classes).float().T @ (pred[:, None] == classes).float()).long()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stats, confusion = evaluate_confusion(totals_model, batches, 10, torch.device("cuda"), dist.DistEnv(), "fp32")
    assert stats["count"] == 64 and int(confusion.sum()) == 64


# ---- 10. smaller ---------------------------------------------------------------------------------------

def test_exit_after_a_failure_leaves_the_group_alone(monkeypatch):
    torn = []
    monkeypatch.setattr(dist, "teardown", lambda: torn.append(1))
    monkeypatch.setattr(dist.os, "_exit", lambda code: torn.append(f"exit {code}"))
    env = dist.DistEnv(world_size=2)
    dist.exit_process(1, env)
    assert torn == ["exit 1"]
    dist.exit_process(0, env)
    assert torn == ["exit 1", 1, "exit 0"]


def test_replica_check_sums_per_parameter_without_a_full_float64_copy():
    # the checksum of the whole flattened model equals the per-parameter accumulation
    net = nn.Sequential(nn.Linear(300, 200), nn.Linear(200, 7))
    flat = torch.cat([p.detach().double().flatten() for p in net.parameters()])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64) % 9973
    expected = torch.stack([flat.sum(), (flat * weights).sum()])
    seen = {}

    class FakeRun:
        env = dist.DistEnv(world_size=2)
        model = net

    def gather(t, env):
        seen["t"] = t
        return [t, t]

    original = engine.all_gather_tensor
    engine.all_gather_tensor = gather
    try:
        engine.check_replicas(FakeRun())  # type: ignore[arg-type]
    finally:
        engine.all_gather_tensor = original
    torch.testing.assert_close(seen["t"], expected, rtol=1e-12, atol=1e-9)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
