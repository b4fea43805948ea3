"""Torch datasets over in-memory hips and MR-CT slice pairs (augmentation: ``common.training.augmentation``)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class HipDataset(Dataset):
    """Labelled hips for staging.

    Args:
        images: float32 ``(N, P, K, H, W)``; a missing protocol is all zero.
        available: bool ``(N, P)``; every hip needs at least one available protocol.
        labels: int ``(N,)`` ARCO stages 1..4.

    Items are the stored arrays as they are: the training loop augments whole batches
    (``common.training.augmentation.BatchAugmentation``).

    Item: ``{"image": float32 (P, K, H, W), "available": bool (P,), "label": int64 class index
    (stage - 1)}``.
    """

    def __init__(
        self,
        images: np.ndarray,
        available: np.ndarray,
        labels: np.ndarray,
    ) -> None:
        images, available, labels = np.asarray(images), np.asarray(available), np.asarray(labels)
        if images.ndim != 5:
            raise ValueError(f"HipDataset: images must be (N, P, K, H, W), got shape {images.shape}")
        n, p = images.shape[:2]
        if available.shape != (n, p) or available.dtype != bool:
            raise ValueError(
                f"HipDataset: available must be bool (N, P) = ({n}, {p}), got {available.dtype} {available.shape}"
            )
        if labels.shape != (n,):
            raise ValueError(f"HipDataset: labels must be (N,) = ({n},), got {labels.shape}")
        if n and not np.isin(labels, (1, 2, 3, 4)).all():
            raise ValueError(
                f"HipDataset: labels must be ARCO stages 1..4, got values {sorted(set(labels.tolist()))}"
            )
        empty = np.flatnonzero(~available.any(axis=1))
        if empty.size:
            raise ValueError(f"HipDataset: hips {empty[:10].tolist()} have no available protocol; drop them")
        self.images = images.astype(np.float32, copy=False)
        self.available = available
        self.class_indices = labels.astype(np.int64) - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "image": torch.from_numpy(self.images[index]),
            "available": torch.from_numpy(self.available[index].copy()),
            "label": torch.tensor(self.class_indices[index], dtype=torch.int64),
        }


class PairDataset(Dataset):
    """Registered MR-CT slice pairs for the translation pretraining.

    Args:
        mr: float32 ``(N, H, W)`` MR slices (normalised as the hips are).
        ct: float32 ``(N, H, W)`` CT resampled onto the MR slices, normalised HU in [-1, 1].

    Item: ``{"mr": float32 (1, H, W), "ct": float32 (1, H, W)}``.
    """

    def __init__(self, mr: np.ndarray, ct: np.ndarray) -> None:
        mr, ct = np.asarray(mr), np.asarray(ct)
        if mr.ndim != 3 or mr.shape != ct.shape:
            raise ValueError(f"PairDataset: mr and ct must both be (N, H, W), got {mr.shape} and {ct.shape}")
        self.mr = mr.astype(np.float32, copy=False)
        self.ct = ct.astype(np.float32, copy=False)

    def __len__(self) -> int:
        return len(self.mr)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"mr": torch.from_numpy(self.mr[index])[None], "ct": torch.from_numpy(self.ct[index])[None]}


class DenoisingPairs(Dataset):
    """Noisy MR to MR: the pretraining control that needs no CT (``pretrain-target = "mr-denoise"``).

    The input is the MR slice with fresh Gaussian noise of ``sigma`` (in units of the slice's
    foreground median, which normalisation sets to 1) at every draw; the target is the clean slice
    mapped from [0, 4] onto the translation network's tanh range [-1, 1], as CT is. (With DataLoader
    workers each worker draws from its own copy of the generator: noise repeats across workers.)

    Args:
        mr: float32 ``(N, H, W)`` normalised MR slices.
        sigma: noise standard deviation.
        seed: the noise generator's seed.

    Item: ``{"mr": float32 (1, H, W) noisy input, "ct": float32 (1, H, W) the clean target}``.
    """

    def __init__(self, mr: np.ndarray, sigma: float = 0.3, seed: int = 0) -> None:
        self.mr = np.asarray(mr, dtype=np.float32)
        if self.mr.ndim != 3:
            raise ValueError(f"DenoisingPairs: mr must be (N, H, W), got {self.mr.shape}")
        self.sigma = np.float32(sigma)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.mr)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        clean = self.mr[index]
        noisy = clean + self.sigma * self.rng.standard_normal(clean.shape, dtype=np.float32)
        target = np.clip(clean, 0.0, 4.0) * np.float32(0.5) - np.float32(1.0)
        return {"mr": torch.from_numpy(noisy)[None], "ct": torch.from_numpy(target)[None]}


def pretraining_pairs(mr: np.ndarray, ct: np.ndarray, target: str, seed: int = 0) -> Dataset:
    """Phase 1's dataset for run-config ``pretrain-target``: MR-to-CT pairs, or noisy MR to MR."""
    if target == "ct":
        return PairDataset(mr, ct)
    if target == "mr-denoise":
        return DenoisingPairs(mr, seed=seed)
    raise ValueError(f"unknown pretraining target {target!r}: use 'ct' or 'mr-denoise'")


def dataset_class_indices(dataset: Dataset) -> np.ndarray:
    """Class indices (stage - 1) of every item of a staging dataset, ``(N,)`` int64.

    Reads ``HipDataset.class_indices`` directly (also through ``Subset`` and ``ConcatDataset``);
    any other dataset is iterated once.
    """
    if isinstance(dataset, HipDataset):
        return dataset.class_indices
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_class_indices(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return np.concatenate([dataset_class_indices(d) for d in dataset.datasets])
    return np.asarray([int(dataset[i]["label"]) for i in range(len(dataset))], dtype=np.int64)
