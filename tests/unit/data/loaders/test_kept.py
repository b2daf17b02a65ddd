"""dtl.data.loaders.kept: an image folder's evaluation decodes once and gives the per-image eval transform's
numbers."""

import torch

from dtl.config import Config
from dtl.data import folder_split, loaders
from dtl.data.loaders import WorkerLoader
from dtl.distributed import DistEnv
from tests.unit.data.loaders.test_decode import folder_of


def test_folder_evaluation_decodes_once_and_gives_the_files_numbers(tmp_path, monkeypatch):
    """Without a cache, the evaluation split's decoded images are kept after the first pass (within
    --eval-memory-mib): the second pass reads no file, and both are bitwise the per-image eval transform's."""
    split = folder_of(tmp_path)
    cfg = Config(dataset="folder", data_dir=str(tmp_path / "images"), image_size=24, batch_size=5, num_workers=0,
                 mode="scratch", data_pipeline="workers")
    reads = []
    real = folder_split.decode
    monkeypatch.setattr(folder_split, "decode", lambda path, decoder="auto": reads.append(path) or real(path, decoder))
    kept = loaders.eval_loader(cfg, split, DistEnv(), torch.device("cpu"))
    assert isinstance(kept, loaders.KeptEvalLoader)
    plain = loaders.eval_loader(cfg.replace(eval_memory_mib=0), split, DistEnv(), torch.device("cpu"))
    assert isinstance(plain, WorkerLoader)
    want = list(plain)
    reads.clear()
    for n_reads in (len(split), 0):  # the first pass decodes every file, the second none
        kept.set_epoch(0)
        got = list(kept)
        assert len(reads) == n_reads
        reads.clear()
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want, strict=True))
        assert got[0][0].is_contiguous(memory_format=torch.channels_last)
    tiny = cfg.replace(eval_memory_mib=len(split) * 3 * 24 * 24 / 2**20 * 0.99)  # just does not fit
    assert isinstance(loaders.eval_loader(tiny, split, DistEnv(), torch.device("cpu")), WorkerLoader)
    # the decode pipeline keeps its squares the same way (and gives the files' numbers too, to float rounding)
    decode = loaders.eval_loader(cfg.replace(data_pipeline="decode"), split, DistEnv(), torch.device("cpu"))
    assert isinstance(decode, loaders.KeptEvalLoader) and isinstance(decode.inner, loaders.DecodeLoader)
    for _ in range(2):
        decode.set_epoch(0)
        got = list(decode)
        assert all(torch.allclose(a[0], b[0], atol=1e-5) and torch.equal(a[1], b[1])
                   for a, b in zip(got, want, strict=True))
    assert len(reads) == len(split)  # decoded by the first pass only
