import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from dtl.data import cifar
from dtl.errors import UserError
from tests.conftest import main_inproc


@pytest.mark.parametrize("fmt", ["py", "bin"])
def test_synth_roundtrip_via_cli(tmp_path: Path, fmt: str, capsys):
    assert main_inproc("data", "synth", "--out", str(tmp_path), "--train", "120", "--test", "30", "--format", fmt) == 0
    train, test = cifar.load_cifar(tmp_path)
    want_train, want_test = cifar.make_synthetic(120, seed=0), cifar.make_synthetic(30, seed=1_000_003)
    assert torch.equal(train.images, want_train.images) and torch.equal(train.labels, want_train.labels)
    assert torch.equal(test.images, want_test.images) and torch.equal(test.labels, want_test.labels)
    assert train.images.dtype == torch.uint8 and train.images.shape == (120, 3, 32, 32)
    capsys.readouterr()
    assert main_inproc("data", "info", "--data-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "train: 120 images" in out and "mean (R,G,B)" in out


def test_restricted_unpickler_refuses_code(tmp_path: Path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    cifar.write_cifar10(tmp_path, cifar.make_synthetic(50), cifar.make_synthetic(10), "py")
    (folder / "data_batch_1").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(UserError, match="os.system|posix.system"):
        cifar.load_cifar(tmp_path)
    assert not marker.exists()


def test_truncated_and_missing_files_are_reported(tmp_path: Path):
    cifar.write_cifar10(tmp_path, cifar.make_synthetic(50), cifar.make_synthetic(10), "bin")
    batch = tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin"
    batch.write_bytes(batch.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        cifar.load_cifar(tmp_path)
    batch.unlink()
    with pytest.raises(UserError, match="data_batch_2.bin is missing"):
        cifar.load_cifar(tmp_path)


def test_labels_out_of_range_are_refused(tmp_path: Path):
    bad = cifar.make_synthetic(20)
    bad.labels[3] = 12
    cifar.write_cifar10(tmp_path, bad, cifar.make_synthetic(10), "bin")
    with pytest.raises(UserError, match="labels range"):
        cifar.load_cifar(tmp_path)


def test_archive_is_extracted(tmp_path: Path):
    src = tmp_path / "src"
    cifar.write_cifar10(src, cifar.make_synthetic(40), cifar.make_synthetic(10), "py")
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    train, _ = cifar.load_cifar(data)
    assert len(train) == 40


def test_offline_download_says_what_to_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as err:
        cifar.load_cifar(tmp_path, allow_download=True)
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path.resolve()) in msg and "--no-download" in msg
    with pytest.raises(UserError, match="--download"):
        cifar.load_cifar(tmp_path, allow_download=False)


def test_synthetic_is_learnable_by_colour_alone():
    split = cifar.make_synthetic(500)
    means = split.images.float().mean(dim=(2, 3))
    centroids = torch.stack([means[split.labels == c].mean(0) for c in range(10)])
    pred = torch.cdist(means, centroids).argmin(1)
    assert (pred == split.labels).float().mean() > 0.5
    assert np.unique(split.labels.numpy()).size == 10


def _write_cifar100(root: Path, fmt: str, n: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    fine, coarse = rng.integers(0, 100, n), rng.integers(0, 20, n)
    if fmt == "py":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name in ("train", "test"):
            payload = {b"data": data, b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist()}
            (folder / name).write_bytes(pickle.dumps(payload, protocol=2))
        meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}
        (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    else:
        folder = root / "cifar-100-binary"
        folder.mkdir(parents=True)
        records = np.concatenate([coarse.astype(np.uint8)[:, None], fine.astype(np.uint8)[:, None], data], 1)
        for name in ("train.bin", "test.bin"):
            (folder / name).write_bytes(records.tobytes())
        (folder / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)))
        (folder / "coarse_label_names.txt").write_text("\n".join(f"c{i}" for i in range(20)))
    return data, fine, coarse


@pytest.mark.parametrize("fmt", ["py", "bin"])
def test_cifar100_both_label_granularities(tmp_path: Path, fmt: str):
    data, fine, coarse = _write_cifar100(tmp_path, fmt)
    train, test = cifar.load_cifar(tmp_path, "cifar100")
    assert train.labels.tolist() == fine.tolist() and len(train.classes) == 100 and train.classes[3] == "f3"
    assert torch.equal(train.images.reshape(-1, 3072), torch.from_numpy(data))
    train, _ = cifar.load_cifar(tmp_path, "cifar100", coarse=True)
    assert train.labels.tolist() == coarse.tolist() and train.classes[:2] == ["c0", "c1"]
