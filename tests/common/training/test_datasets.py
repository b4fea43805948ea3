"""Tests of the hip and MR-CT pair datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, Subset

from common.training.datasets import (
    DenoisingPairs,
    HipDataset,
    PairDataset,
    dataset_class_indices,
    pretraining_pairs,
)


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


def test_pair_item_shapes():
    rng = np.random.default_rng(0)
    mr = rng.normal(size=(3, 24, 24)).astype(np.float32)
    item = PairDataset(mr, np.clip(mr / 3, -1, 1))[1]
    assert item["mr"].shape == (1, 24, 24) and item["ct"].shape == (1, 24, 24)
    assert torch.equal(item["mr"][0], torch.from_numpy(mr[1]))


def test_pair_dataset_validates():
    with pytest.raises(ValueError, match="mr and ct"):
        PairDataset(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))


def test_class_indices_through_subset_and_concat():
    images, available, labels = _hips()
    dataset = HipDataset(images, available, labels)
    assert np.array_equal(dataset_class_indices(Subset(dataset, [2, 0])), labels[[2, 0]] - 1)
    joined = ConcatDataset([dataset, dataset])
    assert np.array_equal(dataset_class_indices(joined), np.concatenate([labels, labels]) - 1)


def test_denoising_pairs_add_fresh_noise_to_the_input_and_map_the_clean_target_onto_tanh_range():
    mr = np.random.default_rng(0).uniform(0.0, 6.0, size=(4, 32, 32)).astype(np.float32)
    pairs = DenoisingPairs(mr, sigma=0.3, seed=1)
    first, again = pairs[0], pairs[0]
    noise = first["mr"][0].numpy() - mr[0]
    assert abs(noise.std() - 0.3) < 0.03 and abs(noise.mean()) < 0.05
    assert not torch.equal(first["mr"], again["mr"])  # a fresh draw each time
    assert torch.equal(first["ct"], again["ct"])
    target = first["ct"][0].numpy()
    assert target.min() >= -1.0 and target.max() <= 1.0
    assert np.allclose(target, np.clip(mr[0], 0.0, 4.0) / 2.0 - 1.0)


def test_pretraining_pairs_follow_the_run_config_target():
    mr = np.zeros((2, 8, 8), np.float32)
    ct = np.ones((2, 8, 8), np.float32)
    assert isinstance(pretraining_pairs(mr, ct, "ct"), PairDataset)
    assert isinstance(pretraining_pairs(mr, ct, "mr-denoise"), DenoisingPairs)
    with pytest.raises(ValueError, match="mr-denoise"):
        pretraining_pairs(mr, ct, "ct-blind")
