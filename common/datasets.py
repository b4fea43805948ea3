"""Torch datasets over in-memory hips and MR-CT slice pairs, with MONAI augmentation."""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, RandAffine, RandGaussianNoise, RandScaleIntensity, RandShiftIntensity
from torch.utils.data import Dataset

# Augmentation strengths (small: the crops are already centred on the femoral head at a fixed FOV).
ROTATE_DEG = 10.0
TRANSLATE_PX = 4.0
SCALE_RANGE = 0.05
INTENSITY_SCALE = 0.1
INTENSITY_SHIFT = 0.1
NOISE_STD = 0.03


def _plain(array: torch.Tensor | np.ndarray) -> torch.Tensor:
    # MONAI returns MetaTensors; the loops want plain float32 tensors.
    if isinstance(array, MetaTensor):
        array = array.as_tensor()
    return torch.as_tensor(array, dtype=torch.float32)


def _spatial_transform(seed: int) -> RandAffine:
    # One affine per call, shared by all channels it receives (slices of a protocol, or MR+CT).
    transform = RandAffine(
        prob=0.8,
        rotate_range=(math.radians(ROTATE_DEG),),
        translate_range=(TRANSLATE_PX, TRANSLATE_PX),
        scale_range=(SCALE_RANGE, SCALE_RANGE),
        padding_mode="border",
    )
    transform.set_random_state(seed=seed)
    return transform


def _intensity_transform(seed: int) -> Compose:
    # Scale/shift draw one factor per call, so all slices of one protocol change together.
    transform = Compose(
        [
            RandScaleIntensity(factors=INTENSITY_SCALE, prob=0.5),
            RandShiftIntensity(offsets=INTENSITY_SHIFT, prob=0.5),
            RandGaussianNoise(prob=0.3, std=NOISE_STD),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


class HipDataset(Dataset):
    """Labelled hips for staging.

    Args:
        images: float32 ``(N, P, K, H, W)``; a missing protocol is all zero.
        available: bool ``(N, P)``; every hip needs at least one available protocol.
        labels: int ``(N,)`` ARCO stages 1..4.
        augment: apply random augmentation (see ``docs/model.md``): one small in-plane affine
            per hip (rotation <= 10 deg, shift <= 4 px, scale +-5 %; one draw for all slices,
            so the slab stays coherent), then per protocol one intensity scale/shift shared by
            its K slices, plus Gaussian noise. No flips: the
            hip crops have a fixed medial/lateral orientation, and a flip along W would make
            anatomy that never occurs at test time. Missing protocols stay all zero.
        seed: seed of the augmentation random state. ``augment`` can be switched later
            (the training loop sets it from ``TrainConfig.augment``).

    Item: ``{"image": float32 (P, K, H, W), "available": bool (P,), "label": int64 class index
    (stage - 1)}``.
    """

    def __init__(
        self,
        images: np.ndarray,
        available: np.ndarray,
        labels: np.ndarray,
        augment: bool = False,
        seed: int = 0,
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
        self.augment = augment
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Reset the augmentation random state (DataLoader workers call this with their own seed)."""
        self._spatial = _spatial_transform(seed)
        self._intensity = _intensity_transform(seed + 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = torch.from_numpy(self.images[index])
        available = self.available[index]
        if self.augment:
            p, k, h, w = image.shape
            # one affine for the whole hip ((P*K, H, W) channel-first 2-D): a single grid per item
            image = _plain(self._spatial(image.reshape(p * k, h, w))).reshape(p, k, h, w)
            for protocol in np.flatnonzero(available):
                # (K, H, W): one intensity draw shared by the K slices of this protocol
                image[protocol] = _plain(self._intensity(image[protocol]))
            image[~torch.from_numpy(available)] = 0.0  # missing protocols stay exactly zero
        return {
            "image": image,
            "available": torch.from_numpy(available.copy()),
            "label": torch.tensor(self.class_indices[index], dtype=torch.int64),
        }


class PairDataset(Dataset):
    """Registered MR-CT slice pairs for the translation pretraining.

    Args:
        mr: float32 ``(N, H, W)`` MR slices (normalised as the hips are).
        ct: float32 ``(N, H, W)`` CT resampled onto the MR slices, normalised HU in [-1, 1].
        augment: one random affine applied to MR and CT together (they stay registered), then
            intensity scale/shift/noise on the MR only (the CT target keeps its HU meaning).
        seed: seed of the augmentation random state.

    Item: ``{"mr": float32 (1, H, W), "ct": float32 (1, H, W)}``.
    """

    def __init__(self, mr: np.ndarray, ct: np.ndarray, augment: bool = False, seed: int = 0) -> None:
        mr, ct = np.asarray(mr), np.asarray(ct)
        if mr.ndim != 3 or mr.shape != ct.shape:
            raise ValueError(f"PairDataset: mr and ct must both be (N, H, W), got {mr.shape} and {ct.shape}")
        self.mr = mr.astype(np.float32, copy=False)
        self.ct = ct.astype(np.float32, copy=False)
        self.augment = augment
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Reset the augmentation random state (DataLoader workers call this with their own seed)."""
        self._spatial = _spatial_transform(seed)
        self._intensity = _intensity_transform(seed + 1)

    def __len__(self) -> int:
        return len(self.mr)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        mr = torch.from_numpy(self.mr[index])[None]
        ct = torch.from_numpy(self.ct[index])[None]
        if self.augment:
            pair = _plain(self._spatial(torch.cat([mr, ct])))
            mr = _plain(self._intensity(pair[:1]))
            ct = pair[1:].clamp(-1.0, 1.0)
        return {"mr": mr, "ct": ct}


def base_datasets(dataset: Dataset) -> list[Dataset]:
    """The datasets under ``Subset`` / ``ConcatDataset`` wrappers (``[dataset]`` if unwrapped)."""
    if isinstance(dataset, torch.utils.data.Subset):
        return base_datasets(dataset.dataset)
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return [base for part in dataset.datasets for base in base_datasets(part)]
    return [dataset]


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
