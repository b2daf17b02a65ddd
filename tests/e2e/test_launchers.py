"""The same train.py under real launchers, on CPU with gloo: torchrun, accelerate, two 'nodes', srun-style."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dtl import models
from tests.conftest import PY, ROOT, TINY, assert_same_weights, fault_env, free_port, rewind_copy, train_inproc

pytestmark = pytest.mark.slow
SHORT = [*TINY, "--epochs", "2", "--train-subset", "64", "--eval-subset", "33", "--batch-size", "8"]


def launch(cmd: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int, *args: str, env: dict | None = None, timeout: float = 300):
    return launch([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "train.py", *args], env, timeout)


def assert_one_run(out: Path, epochs: int = 2) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert all(r["train_count"] == 64 and r["test_count"] == 33 for r in rows)
    top = sorted(p.name for p in out.iterdir())
    assert top == ["checkpoints", "config.json", "curves.png", "metrics.jsonl", "model.safetensors", "status.json"]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["best.json", "step-00000004", "step-00000008"]  # 64 images / (8 x 2 ranks) = 4 steps


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    res = torchrun(2, *SHORT, "--output-dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "model wrapped in DistributedDataParallel (gloo backend, 2 ranks)" in res.stderr
    assert "replicas in sync: identical parameter checksums on all 2 ranks" in res.stderr
    assert_one_run(out)
    cfg = json.loads((out / "config.json").read_text())["run"]
    assert (cfg["launcher"], cfg["world_size"], cfg["global_batch"]) == ("torchrun", 2, 16)


def test_accelerate_launch_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    res = launch([PY, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate_cpu_2proc.yaml",
                  "--main_process_port", str(free_port()), "train.py", *SHORT, "--output-dir", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "model wrapped in DistributedDataParallel (gloo backend, 2 ranks)" in res.stderr
    assert "replicas in sync" in res.stderr
    assert "precision fp32 (accelerate config (no))" in res.stderr  # the config's choice is honoured
    assert_one_run(out)
    assert json.loads((out / "config.json").read_text())["run"]["launcher"] == "accelerate"


def test_same_global_batch_gives_the_same_weights(tmp_path):
    """1 process x batch 8 vs 2 processes x batch 4, no augmentation, no dropout, no BatchNorm (squeezenet).
    Tolerance 1e-5 abs / 1e-4 rel: DDP averages two 4-image gradients where one process takes one 8-image
    mean, so float32 sums are added in another order (about 1e-7 relative per step, over 4 steps)."""
    common = [*TINY, "--epochs", "1", "--train-subset", "32", "--eval-subset", "8", "--no-augment",
              "--dropout", "0", "--lr", "0.01", "--seed", "5"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_inproc(*common, "--batch-size", "8", "--output-dir", str(one)) == 0
    res = torchrun(2, *common, "--batch-size", "4", "--output-dir", str(two))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    torch.manual_seed(5)
    init = models.build_model("squeezenet1_1", 10, "none", 32, dropout=0.0).state_dict()
    assert any((a[k] - init[k]).abs().max() > 1e-3 for k in a)  # training moved the weights...
    for key in a:  # ...and both worlds moved them the same way
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


def test_two_nodes_on_localhost(tmp_path):
    out = tmp_path / "run"
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [PY, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test{port}", "train.py",
               *SHORT, "--output-dir", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "2 ranks" in results[0][1] + results[1][1]
    assert_one_run(out)


def _free_port_between(lo: int, hi: int) -> int:
    import random
    import socket

    for port in random.sample(range(lo, hi), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port - lo
    raise RuntimeError(f"no free port in [{lo}, {hi})")


def test_srun_style_processes_with_only_slurm_variables(tmp_path):
    out = tmp_path / "run"
    job_id = 20000 + _free_port_between(20000, 40000)  # the trainer derives its port as 20000 + job id % 20000
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update({"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
                    "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "localhost",
                    "SLURM_STEP_TASKS_PER_NODE": "2", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
        procs.append(subprocess.Popen([PY, "train.py", *SHORT, "--output-dir", str(out)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "launcher srun, world size 2" in results[0][1]
    assert_one_run(out)


def test_a_rank_that_raises_ends_the_job_quickly(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    res = torchrun(2, *SHORT, "--output-dir", str(out), "--dist-timeout", "60", env=fault_env(2, "raise", rank=1))
    elapsed = time.monotonic() - start
    assert res.returncode != 0
    assert elapsed < 60 + 30, elapsed  # within the process-group timeout plus a margin, not a hang
    text = res.stdout + res.stderr
    assert "RuntimeError: injected fault" in text
    assert "rank     : 1" in text or "rank: 1" in text  # torchrun's summary names the failing rank
    # printed once by the failing rank (torchrun's summary repeats it); the surviving rank says one line
    assert "[rank0]: Traceback" not in text and "] stopping: a collective failed: rank 1 (" in text


def test_slow_rank0_run_files_do_not_kill_the_waiting_rank(tmp_path):
    """Rank 0's writes at the start (trackers, --overwrite) and at the end (final weights, the trackers'
    upload) outlast --dist-timeout: the other rank waits on the I/O group, the run completes."""
    out = tmp_path / "run"
    res = torchrun(2, *SHORT, "--epochs", "1", "--output-dir", str(out), "--dist-timeout", "4",
                   env={"DTL_TEST_SLOW_RUN_FILES": "8"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["state"] == "completed"


def test_debug_under_torchrun_is_refused(tmp_path):
    res = torchrun(2, *SHORT, "--debug", "--output-dir", str(tmp_path / "run"))
    assert res.returncode != 0
    assert res.stderr.count("error: --debug runs a single process, but this launch started 2") == 2, res.stderr
    assert not (tmp_path / "run").exists()


def test_eval_counts_1003_images_once_at_world_sizes_2_and_3(tmp_path):
    out = tmp_path / "run"
    assert train_inproc(*TINY, "--epochs", "1", "--train-subset", "48", "--eval-subset", "1003",
                        "--output-dir", str(out)) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["test_count"] == 1003
    for world in (2, 3):
        res = launch([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m",
                      "dtl.cli", "eval", "--checkpoint", str(out), "--device", "cpu", "--output-dir",
                      str(tmp_path / f"eval{world}")])
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads((tmp_path / f"eval{world}" / "summary.json").read_text())
        assert (summary["world_size"], summary["count"]) == (world, 1003)
        assert summary["top1"] == row["test_acc"]


def test_weights_are_fetched_once_not_by_every_rank(tmp_path):
    """Offline, two ranks: one download attempt (rank 0's), its error said by rank 0 and named once by rank 1,
    exit non-zero, no hang."""
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
    # rank 0 says it once as its own error; rank 1 names rank 0 and repeats that message once
    own = [ln for ln in done.stderr.splitlines() if "could not get the pretrained weights" in ln]
    assert len(own) == 2, done.stderr[-3000:]
    assert sum("[rank 0 on " in ln and "failed:" not in ln for ln in own) == 1, own
    assert sum("[rank 1 on " in ln and "rank 0 (" in ln and "failed:" in ln for ln in own) == 1, own
    assert not (tmp_path / "run").exists()


#: (flags, weight files compared): EMA (every rank keeps the same average); the heavy augmentation set --
#: TrivialAugmentWide + random erasing (the loader's (seed, epoch, rank) stream, replayed on resume) and
#: MixUp/CutMix (draws seeded by (epoch, rank, batch index))
RESUMES = {
    "ema": (["--ema-decay", "0.8"], ("model.safetensors", "model_ema.safetensors")),
    "augment+mix": (["--auto-augment", "ta_wide", "--random-erasing", "0.25", "--mixup", "0.2", "--cutmix", "1.0"],
                    ("model.safetensors",)),
}


@pytest.mark.parametrize("case", list(RESUMES))
def test_resume_mid_epoch_is_bitwise_with_two_processes(tmp_path, case):
    """A resume from a mid-epoch checkpoint under DDP ends bitwise equal to the uninterrupted run."""
    extra, files = RESUMES[case]
    flags = [*TINY, "--train-subset", "64", "--eval-subset", "16", "--batch-size", "8", "--epochs", "2", *extra,
             "--checkpoint-every-steps", "3", "--keep-last", "20"]
    full, part = tmp_path / "full", tmp_path / "part"
    res = torchrun(2, *flags, "--output-dir", str(full))
    assert res.returncode == 0, res.stderr[-3000:]
    rewind_copy(full, part, 3)  # 4 steps per epoch: keep step 3 (mid-epoch 1)
    res = torchrun(2, *flags, "--output-dir", str(part), "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "step-00000003" in res.stderr
    assert_same_weights(full, part, *files)


def test_early_stopping_stops_every_rank_after_patience_epochs(tmp_path):
    out = tmp_path / "run"
    flags = [*TINY, "--train-subset", "32", "--eval-subset", "16", "--batch-size", "8", "--epochs", "10",
             "--early-stop-patience", "2", "--early-stop-min-delta", "100"]  # nothing after epoch 1 counts
    res = torchrun(2, *flags, "--output-dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # the best epoch, then `patience` epochs without progress
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "early-stopped" and status["best_epoch"] == 1
    best = json.loads((out / "checkpoints" / "best.json").read_text())["checkpoint"]
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / best / "model.safetensors"))
    assert best == "step-00000002" and all(torch.equal(a[k], b[k]) for k in a)  # 32 / (8 x 2) = 2 steps/epoch
    res = torchrun(2, *flags, "--output-dir", str(out), "--resume", "auto")  # an early-stopped run stays so
    assert res.returncode == 0 and len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_lp_ft_crosses_the_switch_in_two_processes(tmp_path):
    """DDP is rebuilt when the backbone is unfrozen: no hang, replicas in sync, the backbone trained after."""
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "run"
    res = torchrun(2, *TINY, "--model", "resnet18", "--mode", "lp-ft", "--weights", str(weights), "--lp-epochs", "1",
                   "--epochs", "2", "--train-subset", "32", "--eval-subset", "16", "--batch-size", "8",
                   "--output-dir", str(out), "--dist-timeout", "60")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "lp-ft epoch 1: linear probe" in res.stderr and "lp-ft epoch 2: fine-tuning" in res.stderr
    assert "replicas in sync" in res.stderr
    final = load_file(str(out / "model.safetensors"))
    assert not torch.equal(final["conv1.weight"], torch.load(weights, weights_only=True)["conv1.weight"])


def test_a_same_shape_head_is_new_and_the_same_on_both_ranks(tmp_path):
    """Under torchrun x2, a same-shape head from a weight file is new: the file's 10-class head is replaced by
    the seeded fresh one on every rank (the replica check compares all parameters after the first epoch; one
    step at lr 1e-12 keeps the start)."""
    torch.manual_seed(1)
    src = models.build_model("resnet18", 10, "none", 32)
    weights = tmp_path / "other_task.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))
    out = tmp_path / "run"
    res = torchrun(2, *TINY, "--model", "resnet18", "--mode", "transfer", "--weights", str(weights), "--epochs", "1",
                   "--train-subset", "32", "--eval-subset", "16", "--lr", "1e-12", "--weight-decay", "0",
                   "--seed", "4", "--output-dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "new head: Linear(512, 10) (fc), initialised with seed 4" in res.stderr
    assert "replicas in sync" in res.stderr
    torch.manual_seed(4)
    fresh = torch.nn.Linear(512, 10)
    final = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(final["fc.weight"], fresh.weight.detach(), atol=1e-7, rtol=0)
    assert (final["fc.weight"] - src.fc.weight).abs().max() > 1e-2


def test_two_ranks_share_one_image_cache_written_once(tmp_path):
    """--cache-images under torchrun x2 (gloo): local rank 0 decodes each split once under the lock while rank 1
    waits on the CPU group, then both train from the same memory-mapped files (rank 1 never writes: it would
    stop with "no cache yet" had it come first). A later run finding it up to date: tests/unit/data/
    test_image_cache.py."""
    from tests.unit.data.test_folder import write_folder

    write_folder(tmp_path / "images", per_class=8, bad=False)
    cache = tmp_path / "cache"
    flags = ["--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--val-split", "0.25",
             "--cache-images", str(cache), "--model", "squeezenet1_1", "--mode", "scratch", "--image-size", "32",
             "--batch-size", "4", "--epochs", "1", "--device", "cpu"]
    res = torchrun(2, *flags, "--output-dir", str(tmp_path / "a"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("decoded once") == 2, res.stderr[-3000:]  # train and val, by one process
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".json", ".lock", ".lock", ".u8", ".u8"]
    assert "data pipeline: device" in res.stderr
