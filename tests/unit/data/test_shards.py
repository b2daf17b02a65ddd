"""`dtl data shards` (`dtl.data.shards`) and the shards it writes read back as `--dataset webdataset`
(`dtl.data.webdataset`): the manifest (classes, counts per class, sizes), shards from an image folder and an HF data
set, and every bad input -- an existing --out, a corrupt image, an empty, truncated or changed shard, a sample
without its label, a corrupt image inside a shard -- refused with one message and nothing written, or skipped and
counted with --skip-bad-images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from dtl.config import Config
from dtl.data.webdataset import load_shard_splits
from dtl.errors import UserError
from tests.conftest import main_inproc, snapshot, train_inproc
from tests.unit.data.test_folder import write_folder

pytest.importorskip("webdataset")


def shards_from_folder(tmp_path: Path, *extra: str, per_class: int = 12) -> tuple[int, Path]:
    root = tmp_path / "images"
    if not root.exists():
        write_folder(root, per_class=per_class, bad=False)
    out = tmp_path / "shards"
    code = main_inproc("data", "shards", "--dataset", "folder", "--data-dir", str(root), "--val-split", "0.25",
                       "--out", str(out), "--shard-size", "5", *extra)
    return code, out


def wds_cfg(data_dir: Path | str, **kw) -> Config:
    return Config(dataset="webdataset", data_dir=str(data_dir), mode="scratch", **kw)


def test_shards_of_a_folder_with_their_manifest(tmp_path, capsys):
    code, out = shards_from_folder(tmp_path)
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert len(manifest["classes"]) == 3 and manifest["label_key"] == "cls"
    assert (train["nsamples"], val["nsamples"]) == (27, 9)
    assert train["counts"] == [9, 9, 9] and val["counts"] == [3, 3, 3]
    assert [s["nsamples"] for s in train["shards"]] == [5, 5, 5, 5, 5, 2]
    assert train["sizes"]["width"] == [32, 32, 48] and train["sizes"]["height"][0] == 32
    for s in train["shards"]:
        assert (out / s["url"]).stat().st_size == s["filesize"]
    with tarfile.open(out / train["shards"][0]["url"]) as tar:
        names = tar.getnames()
    assert len(names) == 10 and {n.rsplit(".", 1)[1] for n in names} <= {"png", "jpg", "cls"}
    splits = load_shard_splits(wds_cfg(out))
    assert (len(splits.train), len(splits.test)) == (27, 9) and splits.classes == manifest["classes"]
    assert splits.train.counts() == [9, 9, 9]
    # an existing --out is refused: shards go into a new folder
    code, _ = shards_from_folder(tmp_path)
    assert code == 2 and "exists and is not an empty folder" in capsys.readouterr().err


def test_shards_of_an_hf_data_set_train_and_eval(tmp_path, capsys):
    pytest.importorskip("datasets")
    from tests.unit.data.test_hf import CLASSES, write_hf

    hf = write_hf(tmp_path / "hf", train=30, test=9)
    out = tmp_path / "shards"
    code = main_inproc("data", "shards", "--dataset", "hf", "--data-dir", str(hf), "--out", str(out),
                       "--shard-size", "8")
    assert code == 0, capsys.readouterr().err
    splits = load_shard_splits(wds_cfg(f"{out}/train-{{000000..000003}}.tar", eval_data=f"{out}/val-000000.tar::"
                                       f"{out}/val-000001.tar"))
    assert (len(splits.train), len(splits.test)) == (30, 9) and splits.classes == CLASSES
    code = train_inproc("--dataset", "webdataset", "--data-dir", str(out), "--image-size", "32", "--device", "cpu",
                        "--model", "squeezenet1_1", "--mode", "scratch", "--epochs", "1", "--batch-size", "8",
                        "--num-workers", "1", "--output-dir", str(tmp_path / "run"))
    assert code == 0, capsys.readouterr().err
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["test_count"] == 9


def test_a_corrupt_image_writes_nothing_or_is_left_out(tmp_path):
    """An image that fails the check when it is written (a folder's file damaged after the folder was read)."""
    from dtl.data import shards
    from dtl.data.folder import load_folder_splits

    root = tmp_path / "images"
    write_folder(root, per_class=12, bad=False)
    splits = load_folder_splits(Config(dataset="folder", data_dir=str(root), val_split=0.25, mode="scratch"))
    damaged = splits.train.paths()[4]
    damaged.write_bytes(b"\xff\xd8\xff not a JPEG any more")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"(?s)1 image\(s\) of the train split cannot be decoded.*nothing was written"):
        shards.write_shards(splits, tmp_path / "out", 5, {"dataset": "folder"})
    assert snapshot(tmp_path) == before
    manifest = json.loads(shards.write_shards(splits, tmp_path / "out", 5, {}, skip_bad=True).read_text())
    assert manifest["splits"]["train"]["nsamples"] == 26 and manifest["splits"]["train"]["skipped"] == 1


# ---- bad shards ---------------------------------------------------------------------------------------

def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return path


def png_bytes(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (seed * 40 % 256, 80, 160)).save(buf, "PNG")
    return buf.getvalue()


def good_samples(n: int, start: int = 0) -> list[dict[str, bytes]]:
    return [{"__key__": f"{start + i:06d}", "png": png_bytes(i), "cls": str(i % 2).encode()} for i in range(n)]


@pytest.fixture
def eval_tar(tmp_path: Path) -> Path:
    (tmp_path / "ev").mkdir()
    return write_tar(tmp_path / "ev" / "val-0.tar", good_samples(4))


def load_bare(tmp_path: Path, eval_tar: Path, *shards: Path, **kw):
    """The shards without a manifest: each is read once and every sample checked."""
    return load_shard_splits(wds_cfg("::".join(str(s) for s in shards), eval_data=str(eval_tar), **kw))


def test_shards_without_a_manifest_are_counted_and_checked(tmp_path, eval_tar):
    (tmp_path / "tr").mkdir()
    a = write_tar(tmp_path / "tr" / "a.tar", good_samples(6))
    b = write_tar(tmp_path / "tr" / "b.tar", good_samples(3, 6))
    splits = load_bare(tmp_path, eval_tar, a, b)
    assert len(splits.train) == 9 and splits.train.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0]


def test_an_empty_or_truncated_shard_is_refused(tmp_path, eval_tar):
    (tmp_path / "tr").mkdir()
    good = write_tar(tmp_path / "tr" / "a.tar", good_samples(6))
    empty = tmp_path / "tr" / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty.tar: empty"):
        load_bare(tmp_path, eval_tar, good, empty)
    cut = tmp_path / "tr" / "cut.tar"
    cut.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(UserError, match="cut.tar: truncated"):
        load_bare(tmp_path, eval_tar, good, cut)
    no_samples = write_tar(tmp_path / "tr" / "none.tar", [])
    with pytest.raises(UserError, match="none.tar: empty"):
        load_bare(tmp_path, eval_tar, good, no_samples)


def test_a_shard_listed_in_its_manifest_that_changed_is_refused(tmp_path, capsys):
    code, out = shards_from_folder(tmp_path)
    assert code == 0
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # a copy cut short
    with pytest.raises(UserError, match="train-000001.tar: truncated"):
        load_shard_splits(wds_cfg(out))


def test_a_sample_without_its_label_is_refused(tmp_path, eval_tar):
    (tmp_path / "tr").mkdir()
    samples = good_samples(5)
    del samples[2]["cls"]
    bad = write_tar(tmp_path / "tr" / "a.tar", samples)
    with pytest.raises(UserError, match="sample '000002' of .*a.tar: no label"):
        load_bare(tmp_path, eval_tar, bad)


def test_a_corrupt_image_in_a_shard_is_refused_or_skipped_and_counted(tmp_path, eval_tar, capfd):
    (tmp_path / "tr").mkdir()
    samples = good_samples(6)
    samples[3]["png"] = b"\x89PNG not really"
    bad = write_tar(tmp_path / "tr" / "a.tar", samples)
    with pytest.raises(UserError, match=r"(?s)1 image\(s\) in the shards cannot be decoded.*'000003'.*"
                                        "--skip-bad-images"):
        load_bare(tmp_path, eval_tar, bad)
    splits = load_bare(tmp_path, eval_tar, bad, skip_bad_images=True)
    assert len(splits.train) == 5 and splits.train.shards[0].skip == frozenset({"000003"})
    code = train_inproc("--dataset", "webdataset", "--data-dir", str(bad), "--eval-data", str(eval_tar),
                        "--image-size", "32", "--device", "cpu", "--model", "squeezenet1_1", "--mode", "scratch",
                        "--epochs", "1", "--batch-size", "4", "--num-workers", "0",
                        "--output-dir", str(tmp_path / "run"))
    assert code == 2 and "cannot be decoded" in capfd.readouterr().err
    assert not (tmp_path / "run").exists()


def test_webdataset_settings_that_shards_cannot_serve_are_refused():
    for kw, field in (({"data_pipeline": "workers"}, "data_pipeline"), ({"class_balance": "sampler"}, "class_balance"),
                      ({"subset_order": "random"}, "subset_order"), ({"val_split": 0.1}, "val_split")):
        with pytest.raises(ValueError, match=field):
            wds_cfg("x.tar", **kw)
    with pytest.raises(ValueError, match="eval_data applies to --dataset webdataset"):
        Config(dataset="folder", eval_data="x.tar")
