"""`dtl.data.image_cache` (`--cache-images`): decoded once, the eval transform's pixels exactly, never stale
(a changed, added or deleted image rebuilds it), never trusted when damaged (rebuilt with a message), and a
training run from it that resumes bitwise. The 2-process test (one cache written once for both ranks) is in
tests/e2e/test_launchers.py."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dtl.data import folder, image_cache
from dtl.data.folder_split import FolderSplit
from tests.conftest import assert_same_weights, rewind_copy, train_inproc
from tests.unit.data.test_folder import dtl_log, write_folder


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_folder(root, per_class=6, bad=False)
    return root


def _cache(root: Path, out: Path, size: int = 32, first: bool = True) -> tuple[FolderSplit, list[str]]:
    split = folder.load_image_folder(root)
    with dtl_log() as records:
        cached = image_cache.cached_split(split, "train", out, size, first)
    return cached, [f"{logging.getLevelName(r.levelno)}: {r.getMessage()}" for r in records]


def test_cache_holds_the_eval_transforms_pixels_and_is_reused(photos, tmp_path):
    cached, log = _cache(photos, tmp_path / "c")
    assert any("decoding the 18 images" in m for m in log) and any("decoded once" in m for m in log)
    assert isinstance(cached.images, torch.Tensor) and cached.images.shape == (18, 3, 32, 32)
    # the square is torchvision's Resize(32) + CenterCrop(32) of the file: the eval resize (before the dtype)
    resize_crop = v2.Compose([v2.Resize(32, antialias=True), v2.CenterCrop(32)])
    for i in (0, 1, 2):  # square, wide and tall files
        want = resize_crop(folder.load_image_folder(photos).images[i])
        assert torch.equal(cached.images[i], want)
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "lock", "u8"]
    before = (tmp_path / "c" / files[2]).stat().st_mtime_ns
    again, log = _cache(photos, tmp_path / "c")
    assert any("up to date" in m for m in log) and not any("decod" in m for m in log)
    assert torch.equal(again.images, cached.images) and (tmp_path / "c" / files[2]).stat().st_mtime_ns == before
    # a subset of a cached split keeps its rows
    sub = cached.subset(5, "stratified", 0)
    assert torch.equal(sub.images, cached.images[[cached.files.index(f) for f in sub.files]])


def test_a_changed_added_or_deleted_image_rebuilds_the_cache(photos, tmp_path):
    out = tmp_path / "c"
    first, _ = _cache(photos, out)
    victim = photos / first.files[4]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(victim)  # same name, new content (and size, mtime)
    os.utime(victim, ns=(1, 1))
    changed, log = _cache(photos, out)
    assert any("1 changed" in m and first.files[4] in m and m.startswith("WARNING") for m in log), log
    assert changed.images[4].float().mean(dim=(1, 2)).tolist() == pytest.approx([255, 0, 0], abs=2)
    assert torch.equal(changed.images[:4], first.images[:4])

    Image.new("RGB", (40, 32), (0, 0, 255)).save(photos / first.files[0].split("/")[0] / "zzz.jpg")
    added, log = _cache(photos, out)
    assert any("1 added" in m for m in log) and len(added) == 19
    assert added.images[added.files.index(first.files[0].split("/")[0] + "/zzz.jpg")].float().mean(
        dim=(1, 2)).tolist() == pytest.approx([0, 0, 255], abs=3)

    (photos / first.files[7]).unlink()
    deleted, log = _cache(photos, out)
    assert any("1 removed" in m for m in log) and len(deleted) == 18 and first.files[7] not in deleted.files
    fresh = image_cache.cached_split(folder.load_image_folder(photos), "train", tmp_path / "fresh", 32, True)
    assert torch.equal(deleted.images, fresh.images)


@pytest.mark.parametrize("damage,message", [("flip", "corrupt"), ("truncate", "truncated"),
                                            ("manifest", "manifest"), ("crash", "corrupt")])
def test_a_damaged_cache_is_rebuilt_with_a_message(photos, tmp_path, damage, message):
    out = tmp_path / "c"
    good, _ = _cache(photos, out)
    want = good.images.clone()
    data = next(out.glob("*.u8"))
    raw = bytearray(data.read_bytes())
    if damage == "flip":
        raw[1000] ^= 0x40
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(bytes(raw[:-10]))
    elif damage == "manifest":
        next(out.glob("*.json")).write_text("{not json")
    else:  # a crash after the data was replaced, before the manifest: new data, old manifest's CRC
        raw[:3072] = bytes(3072)
        data.write_bytes(bytes(raw))
    rebuilt, log = _cache(photos, out)
    assert any(message in m and m.startswith("WARNING") for m in log), log
    assert torch.equal(rebuilt.images, want)
    assert _cache(photos, out)[1][-1].endswith("up to date")


def test_a_process_that_is_not_first_only_reads(photos, tmp_path):
    from dtl.errors import UserError

    with pytest.raises(UserError, match="no cache yet"):  # it never writes: the node's first process does
        _cache(photos, tmp_path / "c", first=False)
    assert not list((tmp_path / "c").glob("*.u8"))
    built, _ = _cache(photos, tmp_path / "c")
    read, log = _cache(photos, tmp_path / "c", first=False)
    assert torch.equal(read.images, built.images) and not any("decod" in m for m in log)


def test_training_from_the_cache_resumes_bitwise_and_eval_reads_the_files(photos, tmp_path, capsys):
    """--cache-images with --val-split, a stratified subset and --class-balance: the device pipeline serves both
    splits, the cache lives in image-cache/ beside the run folders and is shared by them; a run resumed in the
    middle of its second epoch ends bitwise equal to the uninterrupted one; `dtl eval` reads the files (the
    same accuracy, up to float rounding of the two transforms), or with --cache-images the run's cache."""
    from dtl import cli

    common = ["--dataset", "folder", "--data-dir", str(photos), "--val-split", "0.25", "--train-subset", "12",
              "--class-balance", "sampler", "--cache-images", "--model", "squeezenet1_1", "--mode", "scratch",
              "--image-size", "32", "--batch-size", "4", "--lr", "0.01", "--device", "cpu", "--seed", "5"]
    full, part = tmp_path / "runs" / "full", tmp_path / "runs" / "part"
    # 12 images / batch 4: 3 steps an epoch; a checkpoint every 2 steps, so step 4 is in the middle of epoch 2
    assert train_inproc(*common, "--epochs", "2", "--checkpoint-every-steps", "2", "--keep-last", "5",
                        "--output-dir", str(full)) == 0
    err = capsys.readouterr().err
    assert "data pipeline: device" in err and "decoded once" in err
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "runs" / "image-cache").glob("*.u8")) == ["train", "val"]
    rewind_copy(full, part, 4)
    assert train_inproc(*common, "--epochs", "2", "--checkpoint-every-steps", "2", "--keep-last", "5",
                        "--output-dir", str(part), "--resume", "auto") == 0
    err = capsys.readouterr().err
    assert "up to date" in err and "decoded once" not in err  # the resumed run reads the cache the first wrote
    assert "step-00000004" in err  # resumed mid-epoch
    assert_same_weights(full, part)
    row = json.loads((full / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_count"] == 12 and row["test_count"] == 6
    assert json.loads((full / "config.json").read_text())["config"]["cache_images"] == "auto"

    assert cli.main(["eval", "--checkpoint", str(full), "--device", "cpu", "--output-dir", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["count"] == 6 and summary["top1"] == pytest.approx(row["test_acc"], abs=1 / 6 + 1e-9)
    assert summary["loss"] == pytest.approx(row["test_loss"], rel=1e-3)
    capsys.readouterr()
    # told to, it evaluates from the run's cache (found up to date): the run's own numbers
    assert cli.main(["eval", "--checkpoint", str(full), "--device", "cpu", "--cache-images",
                     "--output-dir", str(tmp_path / "ev2")]) == 0
    assert "up to date" in capsys.readouterr().err
    cached = json.loads((tmp_path / "ev2" / "summary.json").read_text())
    assert cached["top1"] == row["test_acc"] and cached["loss"] == pytest.approx(row["test_loss"], rel=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("decoder", ["torchvision", "torchcodec"])
def test_cuda_decoding_and_cache_match_the_cpu(photos, tmp_path, decoder):
    """nvJPEG (one batched call; the PNGs on the CPU) gives the CPU decoder's pixels within a few grey levels
    (its IDCT and upsampling differ slightly from libjpeg-turbo's); a cache built on the GPU, and the decode
    pipeline's batches on the GPU, match the CPU's within the same tolerance."""
    from dtl.data import images
    from dtl.data.augment.transform import BatchTransform
    from dtl.data.loaders import DecodeLoader
    from dtl.data.samplers import EvalShardSampler

    if decoder == "torchcodec" and not images.torchcodec_available():
        pytest.skip("TorchCodec is not installed")
    split = folder.load_image_folder(photos)
    gpu = images.decode_batch(split.paths(), "cuda", decoder)
    cpu = [images.decode(p, decoder) for p in split.paths()]
    for g, c in zip(gpu, cpu, strict=True):
        assert g.device.type == "cuda" and g.shape == c.shape
        assert (g.cpu().int() - c.int()).abs().float().mean() < 2
    on_gpu = image_cache.cached_split(split, "train", tmp_path / "g", 32, True, decoder, "cuda")
    on_cpu = image_cache.cached_split(split, "train", tmp_path / "c", 32, True, decoder, "cpu")
    assert (on_gpu.images.int() - on_cpu.images.int()).abs().float().mean() < 2
    loader = DecodeLoader(split, EvalShardSampler(len(split), 0, 1), 8, BatchTransform(False, 24), 32, 1,
                          torch.device("cuda"), seed=0, rank=0, decoder=decoder)
    batches = list(loader)
    assert all(x.device.type == "cuda" and x.shape[1:] == (3, 24, 24) for x, _ in batches)
    assert torch.cat([y for _, y in batches]).cpu().tolist() == split.labels.tolist()
