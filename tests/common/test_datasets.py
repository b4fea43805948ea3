"""Tests of the hip and MR-CT pair datasets and their augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, Subset

from common.datasets import HipDataset, PairDataset, dataset_class_indices


def _hips(n=6, p=3, k=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, p, k, size, size)).astype(np.float32)
    available = np.ones((n, p), dtype=bool)
    available[0, 1] = False
    images[0, 1] = 0.0
    labels = rng.integers(1, 5, size=n)
    return images, available, labels


def test_hip_item_types_and_class_index():
    images, available, labels = _hips()
    item = HipDataset(images, available, labels)[0]
    assert item["image"].shape == (3, 4, 16, 16) and item["image"].dtype == torch.float32
    assert item["available"].dtype == torch.bool and item["available"].tolist() == [True, False, True]
    assert item["label"].dtype == torch.int64 and int(item["label"]) == labels[0] - 1
    assert torch.equal(item["image"], torch.from_numpy(images[0]))


def test_augmentation_changes_available_protocols_only_and_keeps_shapes():
    images, available, labels = _hips()
    dataset = HipDataset(images, available, labels, augment=True, seed=1)
    items = [dataset[0] for _ in range(5)]
    assert all(i["image"].shape == (3, 4, 16, 16) for i in items)
    assert all(torch.all(i["image"][1] == 0) for i in items)  # missing protocol stays zero
    assert any(not torch.allclose(i["image"][0], torch.from_numpy(images[0, 0])) for i in items)
    assert np.array_equal(dataset.images, images)  # the source array is never modified


def test_augmentation_is_shared_across_slices_of_a_protocol():
    # identical slices must stay identical up to the per-voxel noise after augmentation
    images = np.repeat(np.random.default_rng(0).normal(size=(1, 1, 1, 32, 32)), 3, axis=2).astype(np.float32)
    dataset = HipDataset(images, np.ones((1, 1), bool), np.array([2]), augment=True, seed=3)
    for _ in range(5):
        protocol = dataset[0]["image"][0]
        differences = (protocol[1:] - protocol[0]).abs().mean(dim=(1, 2))
        assert torch.all(differences < 0.15), differences


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i, a, lb: (i[0], a, lb), r"\(N, P, K, H, W\)"),
        (lambda i, a, lb: (i, a.astype(int), lb), "available"),
        (lambda i, a, lb: (i, a, lb * 0), "stages 1..4"),
        (lambda i, a, lb: (i, a, lb[:-1]), "labels"),
        (lambda i, a, lb: (i, np.zeros_like(a), lb), "no available protocol"),
    ],
)
def test_hip_dataset_validates(change, message):
    with pytest.raises(ValueError, match=message):
        HipDataset(*change(*_hips()))


def test_pair_dataset_keeps_mr_and_ct_registered():
    rng = np.random.default_rng(0)
    mr = rng.normal(size=(3, 24, 24)).astype(np.float32)
    ct = np.clip(mr / 3, -1, 1)
    plain = PairDataset(mr, ct)[1]
    assert plain["mr"].shape == (1, 24, 24) and plain["ct"].shape == (1, 24, 24)
    augmented = PairDataset(mr, mr * 0.5, augment=True, seed=2)
    for _ in range(4):
        item = augmented[0]
        assert item["ct"].min() >= -1 and item["ct"].max() <= 1
        # same spatial transform on both: ct is still strongly correlated with mr
        corr = np.corrcoef(item["mr"].flatten(), item["ct"].flatten())[0, 1]
        assert corr > 0.8


def test_pair_dataset_validates():
    with pytest.raises(ValueError, match="mr and ct"):
        PairDataset(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))


def test_class_indices_through_subset_and_concat():
    images, available, labels = _hips()
    dataset = HipDataset(images, available, labels)
    assert np.array_equal(dataset_class_indices(Subset(dataset, [2, 0])), labels[[2, 0]] - 1)
    joined = ConcatDataset([dataset, dataset])
    assert np.array_equal(dataset_class_indices(joined), np.concatenate([labels, labels]) - 1)
