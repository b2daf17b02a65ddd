"""`dtl.data.splits`: one seeding rule, one subsetting rule and one stratified sampler for every data source."""

from __future__ import annotations

import pytest
import torch

from dtl.data.folder_split import FolderSplit
from dtl.data.splits import Split, Splits, stratified_indices, stratified_split, stream_seed, subset_indices


def test_stream_seed_is_stable_and_keeps_streams_apart():
    # pinned values: a resumed run's augmentation and dropout draws depend on them
    assert stream_seed(3, 1, 0) == 8105760134395614147
    assert stream_seed(0, 2, 5, 1) == 1676460354547566576
    seeds = {stream_seed(s, e, r) for s in range(3) for e in range(3) for r in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2 ** 63 for s in seeds)
    assert stream_seed(1, 23) != stream_seed(12, 3) and stream_seed(0, 1) != stream_seed(1, 0)
    # class names: the folder's per-class split seed
    names = {stream_seed(0, f"class_{i}") for i in range(50)} | {stream_seed(1, "class_0")}
    assert len(names) == 51 and stream_seed(0, "class_1") == stream_seed(0, "class_1")
    assert stream_seed(1) != stream_seed("1")


def _randperm_subset(total: int, n: int, seed: int) -> list[int]:
    """The random subset rule spelled out: the first n of a seeded permutation, sorted."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()


def test_subset_indices_first_random_and_whole():
    assert subset_indices(10, None) is None and subset_indices(10, 10) is None and subset_indices(10, 12) is None
    assert subset_indices(10, 4) == [0, 1, 2, 3] and subset_indices(10, 0) == []
    for seed in (0, 1, 7):
        idx = subset_indices(50, 12, "random", seed)
        assert idx == _randperm_subset(50, 12, seed) and idx == sorted(set(idx))
    assert subset_indices(50, 12, "random", 0) != subset_indices(50, 12, "random", 1)


def test_stratified_subset_keeps_every_class_in_proportion():
    labels = [0] * 50 + [1] * 30 + [2] * 20  # sorted by class, as a folder's files are
    idx = subset_indices(100, 10, "stratified", 3, labels)
    assert idx == sorted(set(idx)) and len(idx) == 10
    assert [sum(labels[i] == c for i in idx) for c in range(3)] == [5, 3, 2]  # not the first 10 (all class 0)
    assert idx == subset_indices(100, 10, "stratified", 3, labels)  # seeded
    assert idx != subset_indices(100, 10, "stratified", 4, labels)
    # largest remainders: 7 of (5, 3, 2) -> 3.5, 2.1, 1.4 -> 3 + 2 + 1, the spare one to class 0 (remainder .5)
    assert [sum(labels[i] == c for i in stratified_indices(labels, 7, 0)) for c in range(3)] == [4, 2, 1]
    # a class's picks depend on (seed, its name) only: growing another class does not reshuffle it
    grown = labels + [1] * 30
    a = [i for i in stratified_indices(labels, 10, 0, ["a", "b", "c"]) if labels[i] == 0]
    b = [i for i in stratified_indices(grown, 13, 0, ["a", "b", "c"]) if grown[i] == 0]
    assert len(a) == len(b) == 5 and a == b
    with pytest.raises(ValueError, match="labels"):
        subset_indices(100, 10, "stratified", 0)


def test_stratified_subsets_are_pinned():
    """A resumed run re-draws its stratified subset (an in-memory data set saves no split file): the picks of a
    seed must not change."""
    labels = [0] * 7 + [1] * 5 + [2] * 3 + [0] * 2
    assert stratified_indices(labels, 6, 3, ["a", "b", "c"]) == [3, 4, 8, 10, 14, 16]
    assert stratified_indices(labels, 6, 3) == [1, 4, 7, 11, 14, 16]


def test_stratified_split_holds_out_a_fraction_of_every_class():
    labels = [0] * 10 + [1] * 3 + [2] * 1 + [3] * 2
    classes = ["a", "b", "c", "d"]
    train, val = stratified_split(labels, classes, 0.25, seed=5)
    assert train == sorted(train) and val == sorted(val) and sorted(train + val) == list(range(len(labels)))
    # round(0.25 n) per class, at least one and never all when a class has two or more; a lone image trains
    assert [sum(labels[i] == c for i in val) for c in range(4)] == [2, 1, 0, 1]
    assert (train, val) == stratified_split(labels, classes, 0.25, seed=5)
    assert val != stratified_split(labels, classes, 0.25, seed=6)[1]
    # a class's held-out images depend on (seed, its name) only, and they are not the subset's picks
    grown = labels + [1] * 9
    assert [i for i in stratified_split(grown, classes, 0.25, 5)[1] if grown[i] == 0] == \
        [i for i in val if labels[i] == 0]
    assert stratified_split(labels, classes, 0.0, 5) == (list(range(len(labels))), [])


def _splits(total: int) -> tuple[Split, FolderSplit]:
    """An in-memory split and a folder split (never decoded) whose labels / file names give each item's index."""
    memory = Split(torch.arange(total, dtype=torch.uint8).reshape(total, 1, 1, 1).expand(total, 3, 2, 2),
                   torch.arange(total), [str(i) for i in range(total)])
    files = [f"{i}/{i:03d}.png" for i in range(total)]
    return memory, FolderSplit("/nonexistent", files, list(range(total)), [str(i) for i in range(total)])


@pytest.mark.parametrize("order,seed", [("first", 0), ("random", 0), ("random", 5)])
def test_split_and_folder_split_subsets_agree(order, seed):
    memory, folder = _splits(40)
    want = subset_indices(40, 9, order, seed)
    sub_m, sub_f = memory.subset(9, order, seed), folder.subset(9, order, seed)
    assert sub_m.labels.tolist() == want and sub_f.labels.tolist() == want
    assert sub_m.images[:, 0, 0, 0].tolist() == want and sub_f.files == [f"{i}/{i:03d}.png" for i in want]
    assert sub_f.images.files == sub_f.files and sub_m.classes == memory.classes
    if order == "random":
        assert want == _randperm_subset(40, 9, seed)
    assert memory.subset(None) is memory and folder.subset(40) is folder


def test_splits_pair_takes_the_train_classes():
    memory, _ = _splits(4)
    assert Splits(memory, memory.subset(2)).classes == ["0", "1", "2", "3"]
