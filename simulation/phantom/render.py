"""Rendering the phantom: tissue coverage on a voxel grid, then MR (spin echo) and CT acquisitions.

Any voxel grid (any orientation, any spacing) is rendered at its voxel centres; thick slices are
averaged over a few through-plane sub-samples (partial volume). A voxel's value is linear in its
tissue fractions, so one set of coverage maps serves every MR protocol and CT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simulation.phantom.layers import Layer
from simulation.phantom.shapes import Coords, random_unit
from simulation.phantom.tissues import (
    TISSUE_INDEX,
    MRProtocol,
    ct_values,
    lesion_blind_ct_values,
    spin_echo_signal,
    with_lesion_contrast,
)


@dataclass(frozen=True)
class Grid:
    """A voxel grid placed in the anatomy's frame.

    Attributes:
        affine: ``(4, 4)`` mapping index ``(s, r, c, 1)`` to anatomy LPS mm (as
            ``common.sitedata.volume.Volume.affine``).
        shape: ``(S, R, C)``.
        slice_thickness_mm: thickness each slice integrates over (partial volume).
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    slice_thickness_mm: float


class TissueMap:
    """Anti-aliased coverage of every layer on one grid; renders any per-tissue value image."""

    def __init__(self, layers: list[Layer], grid: Grid, max_subsamples: int = 4) -> None:
        affine = np.asarray(grid.affine, dtype=np.float64)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        self.grid = grid
        self.aa_mm = float(min(spacing[1], spacing[2]))
        n_sub = int(np.clip(math.ceil(grid.slice_thickness_mm / self.aa_mm - 1e-6), 1, max_subsamples))
        self.n_sub = n_sub
        offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * (grid.slice_thickness_mm / spacing[0])
        s_axis = (np.arange(grid.shape[0])[:, None] + offsets[None, :]).ravel()
        self.axes = (
            s_axis,
            np.arange(grid.shape[1], dtype=np.float64),
            np.arange(grid.shape[2], dtype=np.float64),
        )
        self.affine = affine
        self.inverse = np.linalg.inv(affine)
        self._last_coords: tuple | None = None
        # Layers without a box (body outline) are smooth and large: painted once per slice
        # centre, before the boxed layers, which are painted on the sub-sampled grid.
        self.coarse_layers: list[tuple[int, np.ndarray]] = []
        self.layers: list[tuple[int, tuple[slice, slice, slice], np.ndarray]] = []
        coarse_coords = None
        for layer in layers:
            if layer.box is None:
                if self.layers:
                    raise ValueError(
                        f"layer {layer.tissue!r} without a box must come before all boxed layers"
                    )
                if coarse_coords is None:
                    coarse_coords = self._coords(None)
                coverage = self._coverage(layer, *coarse_coords)
                self.coarse_layers.append((TISSUE_INDEX[layer.tissue], np.broadcast_to(coverage, grid.shape)))
                continue
            block = self._block(layer.box)
            if block is None:
                continue
            coverage = self._coverage(layer, *self._coords(block))
            coverage = np.broadcast_to(coverage, tuple(s.stop - s.start for s in block))
            if coverage.any():
                self.layers.append((TISSUE_INDEX[layer.tissue], block, coverage))

    def _coverage(self, layer: Layer, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        coverage = np.clip(0.5 - layer.sdf(x, y, z) * (1.0 / self.aa_mm), 0.0, 1.0)
        if layer.weight is not None:
            coverage = coverage * layer.weight(x, y, z)
        return coverage.astype(np.float32, copy=False)

    def _block(self, box: tuple[np.ndarray, np.ndarray]) -> tuple[slice, slice, slice] | None:
        lo, hi = box
        corners = np.array([[(hi if (k >> i) & 1 else lo)[i] for i in range(3)] for k in range(8)])
        index = corners @ self.inverse[:3, :3].T + self.inverse[:3, 3]
        index_lo, index_hi = index.min(0) - 1.0, index.max(0) + 1.0
        block = []
        for axis, a, b in zip(self.axes, index_lo, index_hi, strict=True):
            start, stop = int(np.searchsorted(axis, a, "left")), int(np.searchsorted(axis, b, "right"))
            if stop <= start:
                return None
            block.append(slice(start, stop))
        return tuple(block)

    def _coords(self, block: tuple[slice, slice, slice] | None) -> Coords:
        """Anatomy coordinates of a block of the sub-sampled grid, or of all slice centres (None).

        The last block's arrays are reused, so layers sharing a box share them (and memos keyed
        on them, see ``HipShapes``)."""
        key = None if block is None else tuple((b.start, b.stop) for b in block)
        if self._last_coords is not None and self._last_coords[0] == key:
            return self._last_coords[1]
        coords = self._compute_coords(block)
        self._last_coords = (key, coords)
        return coords

    def _compute_coords(self, block: tuple[slice, slice, slice] | None) -> Coords:
        if block is None:
            axes = [np.arange(n, dtype=np.float32) for n in self.grid.shape]
        else:
            axes = [axis[b].astype(np.float32) for axis, b in zip(self.axes, block, strict=True)]
        s, r, c = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        a = self.affine.astype(np.float32)
        return tuple(a[i, 0] * s + a[i, 1] * r + a[i, 2] * c + a[i, 3] for i in range(3))

    def render(self, tissue_values: np.ndarray) -> np.ndarray:
        """Paint per-tissue values ``(n_tissues,)``: float32 image ``(S, R, C)``, partial volume
        averaged over the through-plane sub-samples."""
        values = np.asarray(tissue_values, dtype=np.float32)
        s, r, c = self.grid.shape
        coarse = np.full((s, r, c), values[TISSUE_INDEX["air"]], dtype=np.float32)
        for tissue, coverage in self.coarse_layers:
            coarse += coverage * (values[tissue] - coarse)
        image = np.repeat(coarse, self.n_sub, axis=0)
        for tissue, block, coverage in self.layers:
            part = image[block]
            part += coverage * (values[tissue] - part)
        return image.reshape(s, self.n_sub, r, c).mean(axis=1)

    def coordinates(self) -> Coords:
        """Anatomy coordinates ``(x, y, z)`` of the voxel centres, each float32 ``(S, R, C)``."""
        return self._coords(None)


@dataclass(frozen=True)
class Scanner:
    """A site's scanner behaviour.

    Attributes:
        gain: stored value per unit signal (vendor scaling).
        noise: Gaussian noise sigma per channel in signal units for T1 (fatty marrow T1
            signal is about 0.55), scaled by each protocol's ``noise_scale``.
        bias: strength of the smooth multiplicative receive-coil bias field (0 = flat).
        ct_noise_hu: CT noise sigma in HU.
        lesion_contrast: how far lesion tissues stand out from marrow on MR (1 = their full
            contrast; see ``tissues.with_lesion_contrast``); CT is unaffected.
        ct_shows_lesions: False renders every lesion tissue at fatty-marrow HU on CT
            (``tissues.lesion_blind_ct_values``); MR is unaffected.
    """

    gain: float = 2000.0
    noise: float = 0.015
    bias: float = 0.15
    ct_noise_hu: float = 12.0
    lesion_contrast: float = 1.0
    ct_shows_lesions: bool = True


def bias_field(coords: Coords, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field at coordinates ``(x, y, z)`` (LPS mm arrays): ``exp`` of a random
    low-order polynomial whose values stay within about +-``strength`` over a 200 mm radius."""
    linear = random_unit(rng) * strength
    quad = rng.normal(0.0, strength * 0.5, size=3)
    log_field = 0.0
    for axis, values in enumerate(coords):
        p = values * np.float32(1.0 / 200.0)
        log_field = log_field + p * np.float32(linear[axis]) + p * p * np.float32(quad[axis])
    return np.exp(log_field).astype(np.float32)


def mr_image(
    tissue_map: TissueMap,
    protocol: MRProtocol,
    scanner: Scanner,
    rng: np.random.Generator,
) -> np.ndarray:
    """One MR acquisition: spin-echo signal, bias field, Rician noise, vendor gain.

    Returns float32 ``(S, R, C)`` in stored units (non-negative).
    """
    signal = tissue_map.render(with_lesion_contrast(spin_echo_signal(protocol), scanner.lesion_contrast))
    signal *= bias_field(tissue_map.coordinates(), scanner.bias, rng)
    sigma = scanner.noise * protocol.noise_scale
    real = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag)  # Rician magnitude
    return magnitude * np.float32(scanner.gain)


def ct_image(tissue_map: TissueMap, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """One CT acquisition in HU with Gaussian noise: float32 ``(S, R, C)``."""
    hu = tissue_map.render(ct_values() if scanner.ct_shows_lesions else lesion_blind_ct_values())
    hu += np.float32(scanner.ct_noise_hu) * rng.standard_normal(hu.shape, dtype=np.float32)
    return hu
