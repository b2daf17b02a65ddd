"""Which data a run reads: the synthetic set, CIFAR-10/100, an image folder, an HF data set or webdataset shards, as
its train and held-out `Splits` with the subsets applied -- read by one process first, then the others (a download
happens once per folder, a Hub data set is fetched once per node)."""

from __future__ import annotations

from pathlib import Path

from dtl.config import Config
from dtl.data.cifar import load_cifar, make_synthetic
from dtl.data.folder import load_folder_splits
from dtl.data.hf import load_hf_splits
from dtl.data.splits import Splits, apply_subsets
from dtl.data.webdataset import load_shard_splits
from dtl.distributed import ProcessGroups

__all__ = ["SYNTHETIC_TEST", "SYNTHETIC_TRAIN", "load_splits", "load_splits_once"]

#: images of the synthetic set's splits (unless --train-subset / --eval-subset say otherwise)
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2000, 500


def load_splits(cfg: Config, allow_download: bool, split_file: Path | None = None,
                is_main: bool = True) -> Splits:
    """Read (or generate) both splits and apply the subsets. `allow_download` is rank 0's privilege.
    `allow_download` does not apply to HF data sets: `load_splits_once` has each node's first process fetch a Hub
    data set into the HF cache before the others read it there.
    Image folders: `split_file` is a saved split to reuse (a resumed run's), `is_main` whether this process
    logs the warnings (see `dtl.data.folder.load_folder_splits`)."""
    if cfg.data.dataset == "synthetic":
        train = make_synthetic(cfg.data.train_subset or SYNTHETIC_TRAIN, seed=cfg.run.seed)
        test = make_synthetic(cfg.data.eval_subset or SYNTHETIC_TEST, seed=cfg.run.seed + 1_000_003)
    elif cfg.data.dataset in ("cifar10", "cifar100"):
        d = cfg.data
        train, test = load_cifar(d.data_dir, d.dataset, allow_download and d.download, d.coarse_labels)
    elif cfg.data.dataset == "hf":
        return load_hf_splits(cfg, is_main=is_main)  # decoded lazily by workers
    elif cfg.data.dataset == "webdataset":
        return load_shard_splits(cfg, is_main=is_main)  # read in order by their own loader
    else:
        return load_folder_splits(cfg, split_file, is_main=is_main)  # decoded lazily by workers
    return apply_subsets(train, test, cfg.data.train_subset, cfg.data.eval_subset, cfg.data.subset_order,
                         cfg.run.seed)


def load_splits_once(cfg: Config, groups: ProcessGroups, split_file: Path | None = None) -> Splits:
    """Global rank 0 reads (and if needed downloads and extracts) first, then the first process of every
    other node (which finds the files when the folder is shared, else fetches its own copy), then the rest,
    which only read: a download happens once per folder and never concurrently into it. Global rank 0 logs
    the data set's warnings (unreadable files, ...) for the whole job."""
    return groups.main_first(lambda first: load_splits(cfg, allow_download=first, split_file=split_file,
                                                       is_main=groups.env.is_main))
