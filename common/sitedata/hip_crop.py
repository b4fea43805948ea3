"""Crop one hip from every MR protocol into the fixed physical box of ``HipGrid``."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from common.sitedata.settings import HipGrid, PreprocessSettings
from common.sitedata.volume import Volume

# A protocol whose volume holds fewer than this share of the crop's points counts as missing.
MIN_COVERAGE = 0.8


class HipCrops(NamedTuple):
    """One hip cropped from every protocol (unpacks as ``image, available, notes``).

    Attributes:
        image: float32 ``(P, K, H, W)`` normalised MR, in the order of ``settings.protocols``;
            an unavailable protocol is all zeros.
        available: bool ``(P,)``.
        notes: human-readable reasons why an existing volume was not used (empty when none).
    """

    image: np.ndarray
    available: np.ndarray
    notes: list[str]


def _canonical(direction: np.ndarray, down: bool = False) -> np.ndarray:
    """Give a unit direction a site-independent sign.

    The vector is made to point along its dominant patient axis positively (to the patient's
    left, posterior, head), except for the in-plane "down" direction whose dominant axis is z:
    that one points to the feet, as in the usual display of coronal and sagittal images.
    """
    direction = direction / np.linalg.norm(direction)
    axis = int(np.argmax(np.abs(direction)))
    want_positive = not (down and axis == 2)
    if (direction[axis] > 0) != want_positive:
        direction = -direction
    return direction


def grid_axes(volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The crop's unit axes ``(slice normal, image down, image right)`` in LPS for a volume.

    Parallel to the volume's own slice, column and row directions, with canonical signs (see
    ``_canonical``) so that sites storing slices or rows in opposite orders give the same crop.
    """
    normal = _canonical(volume.affine[:3, 0])
    down = _canonical(volume.affine[:3, 1], down=True)
    right = _canonical(volume.affine[:3, 2])
    return normal, down, right


def hip_grid_points(volume: Volume, centre_mm: np.ndarray, grid: HipGrid, side: str) -> np.ndarray:
    """LPS points of the hip box in a volume's own slice geometry.

    Args:
        volume: the protocol's volume (only its orientation is used).
        centre_mm: ``(3,)`` femoral-head centre in LPS mm.
        grid: ``grid.slices`` slices spanning ``grid.slab_mm`` along the slice normal, each
            ``grid.size x grid.size`` pixels over ``grid.fov_mm``; sample points are cell
            centres, so the box is centred on ``centre_mm`` exactly.
        side: ``"R"`` or ``"L"``. Mirroring convention: for ``"L"`` the grid axis closest to the
            patient's x (left-right) axis is reversed, so every hip looks like a right hip in
            radiological display: on coronal and axial crops the lateral side is at column 0
            (image left); on sagittal crops the first slice is the most lateral one.

    Returns:
        float64 ``(K, H, W, 3)`` points in LPS mm.
    """
    if side not in ("L", "R"):
        raise ValueError(f"side must be 'L' or 'R', got {side!r}")
    axes = grid_axes(volume)
    spacings = (grid.slab_mm / grid.slices, grid.fov_mm / grid.size, grid.fov_mm / grid.size)
    counts = (grid.slices, grid.size, grid.size)
    offsets = [(np.arange(n) - (n - 1) / 2.0) * step for n, step in zip(counts, spacings, strict=True)]
    if side == "L":
        lateral_axis = int(np.argmax([abs(axis[0]) for axis in axes]))
        offsets[lateral_axis] = offsets[lateral_axis][::-1].copy()
    k, h, w = np.meshgrid(*offsets, indexing="ij")
    centre = np.asarray(centre_mm, dtype=np.float64).reshape(3)
    return centre + k[..., None] * axes[0] + h[..., None] * axes[1] + w[..., None] * axes[2]


def points_spacing(points: np.ndarray) -> np.ndarray:
    """Spacing in mm between neighbouring points along each axis of a ``(..., 3)`` grid."""
    steps = []
    for axis in range(points.ndim - 1):
        if points.shape[axis] < 2:
            steps.append(0.0)
            continue
        first = np.take(points, [0, 1], axis=axis)
        steps.append(
            float(np.linalg.norm(np.take(first, 1, axis=axis) - np.take(first, 0, axis=axis), axis=-1).mean())
        )
    return np.asarray(steps)


def sub_volume(volume: Volume, points_mm: np.ndarray, margin_mm: float) -> Volume | None:
    """The part of a volume that holds ``points_mm`` plus a margin, as its own ``Volume``.

    Returns ``None`` when the points' bounding box misses the volume entirely. Used so that
    prefiltering touches only the voxels a crop needs, not a whole CT.
    """
    index = world_to_index(volume, np.asarray(points_mm).reshape(-1, 3))
    margin_vox = margin_mm / volume.spacing
    lo = np.floor(index.min(0) - margin_vox).astype(int)
    hi = np.ceil(index.max(0) + margin_vox).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, volume.pixels.shape)
    if np.any(hi <= lo):
        return None
    affine = volume.affine.copy()
    affine[:3, 3] = volume.index_to_world(lo.astype(np.float64))
    pixels = volume.pixels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return Volume(pixels=pixels, affine=affine, modality=volume.modality, protocol=volume.protocol)


def antialias_sigma(source_spacing: np.ndarray, target_spacing: np.ndarray) -> np.ndarray:
    """Gaussian sigma in source voxels before resampling at a coarser spacing.

    ``(ratio - 1) / 2`` per axis (the scikit-image ``rescale`` rule): no smoothing when the
    target is as fine as the source, about half the ratio when much coarser.
    """
    ratio = np.asarray(target_spacing, dtype=np.float64) / np.asarray(source_spacing, dtype=np.float64)
    return np.maximum(0.0, (ratio - 1.0) / 2.0)


def target_spacing_along_source(volume: Volume, points: np.ndarray) -> np.ndarray:
    """The sampling step of a point grid seen along each of the volume's index axes (mm).

    For each source axis, the largest projection of a grid step onto it; exact when the grid
    is aligned with the volume, conservative when oblique.
    """
    grid_steps = points_spacing(points)
    directions = []
    for axis in range(points.ndim - 1):
        if points.shape[axis] < 2:
            directions.append(np.zeros(3))
            continue
        delta = np.take(points, 1, axis=axis) - np.take(points, 0, axis=axis)
        directions.append(delta.reshape(-1, 3).mean(0))
    source_dirs = volume.affine[:3, :3] / volume.spacing
    out = np.zeros(3)
    for a in range(3):
        for step, delta in zip(grid_steps, directions, strict=True):
            norm = np.linalg.norm(delta)
            if norm > 0:
                out[a] = max(out[a], abs(float(source_dirs[:, a] @ (delta / norm))) * step)
    return out


def world_to_index(volume: Volume, points: np.ndarray) -> np.ndarray:
    """``volume.world_to_index`` written element-wise: ``(N, 3)`` LPS -> ``(N, 3)`` indices.

    A BLAS matrix product here is tiny work but can stall for a long time on a shared CPU
    (threads waiting on each other), so the three columns are summed directly.
    """
    inverse = np.linalg.inv(volume.affine)
    points = np.asarray(points, dtype=np.float64)
    return (
        points[:, 0:1] * inverse[:3, 0]
        + points[:, 1:2] * inverse[:3, 1]
        + points[:, 2:3] * inverse[:3, 2]
        + inverse[:3, 3]
    )


def sample_with_mask(
    volume: Volume, points: np.ndarray, target_spacing_mm: np.ndarray | float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Like ``sample_points`` but returns the per-point inside mask ``(...)`` instead of its mean."""
    points = np.asarray(points, dtype=np.float64)
    if target_spacing_mm is None:
        target = target_spacing_along_source(volume, points)
    else:
        target = np.broadcast_to(np.asarray(target_spacing_mm, dtype=np.float64), (3,))
    sigma = antialias_sigma(volume.spacing, target)
    flat = points.reshape(-1, 3)
    index = world_to_index(volume, flat)
    shape = np.asarray(volume.pixels.shape)
    inside = np.all((index >= -0.5) & (index <= shape - 0.5), axis=1)
    values = np.zeros(len(flat), dtype=np.float32)
    if inside.any():
        # Only the block of voxels the points need (plus the filter's reach) is prefiltered.
        margin = np.ceil(3.0 * sigma).astype(int) + 2
        lo = np.maximum(np.floor(index[inside].min(0)).astype(int) - margin, 0)
        hi = np.minimum(np.ceil(index[inside].max(0)).astype(int) + margin + 1, shape)
        block = volume.pixels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32, copy=False)
        if np.any(sigma > 0.05):
            block = ndimage.gaussian_filter(block, sigma=sigma, mode="nearest")
        # Within half a voxel of the edge, use the edge value rather than blending with zero.
        local = np.clip(index[inside], 0, shape - 1) - lo
        values[inside] = ndimage.map_coordinates(block, local.T, order=1, mode="nearest")
    return values.reshape(points.shape[:-1]), inside.reshape(points.shape[:-1])


def sample_points(
    volume: Volume, points: np.ndarray, target_spacing_mm: np.ndarray | float | None = None
) -> tuple[np.ndarray, float]:
    """Trilinear samples of a volume at ``(..., 3)`` LPS points, anti-aliased, with coverage.

    Args:
        volume: source volume.
        points: ``(..., 3)`` LPS mm.
        target_spacing_mm: sampling step of the points along the source axes; scalar for an
            isotropic grid, ``None`` to infer it from a regular ``points`` grid. When coarser
            than the source spacing, the source is gaussian-prefiltered first (only the block
            of voxels the points need).

    Returns:
        ``(values float32 (...), coverage)``: points outside the volume give 0; ``coverage`` is
        the share of points inside it (within half a voxel of the outermost voxel centres,
        where the edge value is used).
    """
    values, inside = sample_with_mask(volume, points, target_spacing_mm)
    return values, float(inside.mean()) if inside.size else 0.0


def crop_hip(volume: Volume, centre_mm: np.ndarray, grid: HipGrid, side: str) -> np.ndarray:
    """Resample one hip box from a volume (raw intensities, not normalised).

    Args:
        volume: the protocol's volume.
        centre_mm: ``(3,)`` femoral-head centre in LPS mm.
        grid: the crop box (see ``hip_grid_points``).
        side: ``"R"`` or ``"L"`` (``"L"`` is mirrored, see ``hip_grid_points``).

    Returns:
        float32 ``(K, H, W)``; points outside the volume are 0.
    """
    points = hip_grid_points(volume, centre_mm, grid, side)
    values, _ = sample_points(volume, points)
    return values


def crop_coverage(volume: Volume, centre_mm: np.ndarray, grid: HipGrid, side: str) -> float:
    """Share of the hip box's points that lie inside the volume (0..1)."""
    points = hip_grid_points(volume, centre_mm, grid, side).reshape(-1, 3)
    index = world_to_index(volume, points)
    shape = np.asarray(volume.pixels.shape)
    return float(np.all((index >= -0.5) & (index <= shape - 0.5), axis=1).mean())


def normalise_mr(crop: np.ndarray) -> np.ndarray:
    """Scale an MR crop by the median of its foreground (divisive, no offset).

    MR intensities are ratio-scaled: vendor gain multiplies them and the bias field is nearly
    constant across a 64 mm box, so dividing by one robust statistic of the crop removes both,
    and 0 still means "no signal" (the value of a missing protocol). The median of the
    foreground (voxels above 10 % of the 99th percentile, i.e. not air or outside the volume)
    is used rather than a high percentile because lesions (oedema on fat-suppressed images, low
    T1 bands) are bright or dark tails that should not move the scale. Values are clipped to
    [0, 10] to bound outliers.

    Args:
        crop: ``(K, H, W)`` (any shape) raw MR intensities.

    Returns:
        float32, same shape; all zeros when the crop has no signal.
    """
    crop = np.asarray(crop, dtype=np.float32)
    top = float(np.percentile(crop, 99.0)) if crop.size else 0.0
    if top <= 0:
        return np.zeros_like(crop)
    foreground = crop[crop > 0.1 * top]
    scale = float(np.median(foreground))
    return np.clip(crop / scale, 0.0, 10.0).astype(np.float32)


def crop_hip_protocols(
    volumes: dict[str, Volume], centre_mm: np.ndarray, side: str, settings: PreprocessSettings
) -> HipCrops:
    """Crop and normalise one hip from every protocol of a patient.

    Args:
        volumes: protocol key -> volume, for the protocols this patient has.
        centre_mm: ``(3,)`` femoral-head centre in LPS mm (MR session).
        side: ``"R"`` or ``"L"``.
        settings: gives the protocol order and the crop grid.

    Returns:
        ``HipCrops(image (P, K, H, W) float32, available (P,) bool, notes)``. A protocol with no
        volume is zeros and unavailable; one whose volume holds fewer than ``MIN_COVERAGE`` of
        the box's points is also unavailable, with a note saying so.
    """
    grid = settings.grid
    image = np.zeros((len(settings.protocols), grid.slices, grid.size, grid.size), dtype=np.float32)
    available = np.zeros(len(settings.protocols), dtype=bool)
    notes: list[str] = []
    for index, protocol in enumerate(settings.protocols):
        volume = volumes.get(protocol)
        if volume is None:
            continue
        points = hip_grid_points(volume, centre_mm, grid, side)
        values, coverage = sample_points(volume, points)
        if coverage < MIN_COVERAGE:
            notes.append(
                f"{protocol}: the {side} hip box covers only {coverage:.0%} of its points inside the "
                f"series (needs {MIN_COVERAGE:.0%}); treated as missing. Check the series' field of "
                "view or the femoral-head centre."
            )
            continue
        image[index] = normalise_mr(values)
        available[index] = True
    return HipCrops(image=image, available=available, notes=notes)
