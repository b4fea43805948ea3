"""Random augmentation of whole training batches, on the device that trains.

One call augments a batch: a random in-plane affine per sample, resampled for the whole batch
by MONAI's batched spatial transformer (``monai.networks.layers.AffineTransform``), then
intensity scale, shift and Gaussian noise as tensor arithmetic. Done per item in the
DataLoader (MONAI ``RandAffine`` per hip), the same augmentation cost 16-18 % of each step
waiting for data on 2 CPU cores; batched, it is one grid and one ``grid_sample`` per step,
and on a GPU it runs there.

Strengths (small: the crops are already centred on the femoral head at a fixed field of view):

- affine, probability 0.8 per sample: rotation up to 10 deg, shift up to 4 px, scale +-5 %,
  border padding; one draw per hip moves every slice of every protocol together (the slab
  stays coherent), and one per MR-CT pair moves MR and CT together (they stay registered);
- per hip and protocol (all K slices together): intensity scale ``x * (1 + f)``,
  ``f ~ U(-0.1, 0.1)``, probability 0.5; shift ``x + o``, ``o ~ U(-0.1, 0.1)``, probability 0.5;
  Gaussian noise with ``std ~ U(0, 0.03)``, probability 0.3 (as MONAI's ``RandScaleIntensity``,
  ``RandShiftIntensity`` and ``RandGaussianNoise``);
- no flips: the hip crops have a fixed medial/lateral orientation, and a flip along W would
  make anatomy that never occurs at test time.

Missing protocols stay exactly zero; the CT target gets the affine only (its HU meaning is kept)
and stays in [-1, 1].
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers import AffineTransform

AFFINE_PROB = 0.8
ROTATE_DEG = 10.0
TRANSLATE_PX = 4.0
SCALE_RANGE = 0.05
SCALE_PROB, INTENSITY_SCALE = 0.5, 0.1
SHIFT_PROB, INTENSITY_SHIFT = 0.5, 0.1
NOISE_PROB, NOISE_STD = 0.3, 0.03


class BatchAugmentation:
    """Draws and applies the augmentation of training batches; one instance per training call.

    Args:
        seed: seed of the random stream (parameters and noise are drawn on the CPU from it, so
            a run is reproducible on any device).

    ``hips(image, available)`` takes ``(B, P, K, H, W)`` and bool ``(B, P)``; ``pairs(mr, ct)``
    takes ``(B, 1, H, W)`` twice. Both return new tensors on the input's device and never
    modify their inputs.
    """

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self._warp = AffineTransform(normalized=True, padding_mode="border", align_corners=True)

    def _uniform(self, shape: tuple[int, ...], half_width: float) -> torch.Tensor:
        return (torch.rand(shape, generator=self.generator) * 2 - 1) * half_width

    def _happens(self, shape: tuple[int, ...], prob: float) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator) < prob

    def _thetas(self, batch: int, height: int, width: int) -> torch.Tensor:
        """``(B, 2, 3)`` affines in normalised coordinates (``[-1, 1]``, corners aligned)."""
        angle = self._uniform((batch,), math.radians(ROTATE_DEG))
        scale = 1 + self._uniform((batch,), SCALE_RANGE)
        shift = self._uniform((batch, 2), TRANSLATE_PX)
        keep = ~self._happens((batch,), AFFINE_PROB)  # samples left as they are
        angle[keep], scale[keep], shift[keep] = 0.0, 1.0, 0.0
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.zeros(batch, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        # pixels to normalised units: the image spans 2 units over (size - 1) pixels; rows and
        # columns in (H, W) order (AffineTransform's reverse_indexing)
        theta[:, 0, 2] = shift[:, 0] * 2 / max(height - 1, 1)
        theta[:, 1, 2] = shift[:, 1] * 2 / max(width - 1, 1)
        return theta

    def _warped(self, image: torch.Tensor) -> torch.Tensor:
        """Apply one random affine per sample to ``(B, C, H, W)`` (all C channels together)."""
        b, _, h, w = image.shape
        theta = self._thetas(b, h, w).to(image.device)
        return self._warp(image.float(), theta)

    def _intensity(self, image: torch.Tensor, groups: tuple[int, ...]) -> torch.Tensor:
        """Scale, shift and noise of ``image``; one scale/shift/noise draw per ``groups`` index."""
        view = (*groups,) + (1,) * (image.dim() - len(groups))
        factor = torch.where(self._happens(groups, SCALE_PROB), self._uniform(groups, INTENSITY_SCALE), 0.0)
        offset = torch.where(self._happens(groups, SHIFT_PROB), self._uniform(groups, INTENSITY_SHIFT), 0.0)
        noisy = self._happens(groups, NOISE_PROB)
        std = torch.where(noisy, torch.rand(groups, generator=self.generator) * NOISE_STD, 0.0)
        noise = torch.randn(image.shape, generator=self.generator)
        device = image.device
        return (
            image * (1 + factor.view(view).to(device))
            + offset.view(view).to(device)
            + noise.to(device) * std.view(view).to(device)
        )

    def hips(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Augmented copy of a staging batch ``(B, P, K, H, W)``; missing protocols stay zero."""
        b, p, k, h, w = image.shape
        warped = self._warped(image.reshape(b, p * k, h, w)).reshape(b, p, k, h, w)
        out = self._intensity(warped, (b, p))
        return out * available.view(b, p, 1, 1, 1).to(out.dtype)

    def pairs(self, mr: torch.Tensor, ct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented copies of a batch of registered MR-CT slices ``(B, 1, H, W)`` each."""
        warped = self._warped(torch.cat([mr, ct], dim=1))
        return self._intensity(warped[:, :1], (len(mr),)), warped[:, 1:].clamp(-1.0, 1.0)
