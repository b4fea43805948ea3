"""Find both femoral heads on a pelvic MR: a spherical matched filter in patient coordinates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft

from common.sitedata.hip_crop import sample_with_mask
from common.sitedata.volume import Volume

SEARCH_SPACING_MM = 4.0  # isotropic grid of the global search (refined locally at 1.5 mm)
REFINE_SPACING_MM = 1.5  # local grid around each coarse peak
REFINE_MOVES = 2  # times the local grid may follow a peak found on its edge
SHELL_MM = 4.0  # dark rim around the bright ball: cortex, cartilage, joint space
MIN_NCC = 0.25  # below this the best sphere in a half is not taken for a femoral head
MIDLINE_MARGIN_MM = 10.0  # candidate centres keep at least this far from x = 0
MIN_SUPPORT_INSIDE = 0.75  # share of the template support that must lie inside the volume
# One FFT thread: the grids are small (~0.3 M voxels), and site loading already runs one
# process per core; more threads only contend for a shared CPU.
FFT_THREADS = 1


class LocalizationError(ValueError):
    """The volume shows no femoral-head-like sphere on one side (message says which and why)."""


@dataclass
class HeadEstimate:
    """One femoral head found on an MR volume.

    Attributes:
        side: ``"L"`` (patient's left, x > 0 in LPS) or ``"R"``.
        centre_mm: ``(3,)`` centre in LPS mm.
        radius_mm: radius of the best-matching sphere template.
        confidence: 0..1, the peak's normalised cross-correlation scaled down when another
            sphere-like spot in the same half scores nearly as well.
    """

    side: str
    centre_mm: np.ndarray
    radius_mm: float
    confidence: float


def _regular_grid(lo: np.ndarray, hi: np.ndarray, spacing: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Axis coordinates and ``(X, Y, Z, 3)`` LPS points of an axis-aligned grid over a box."""
    axes = [lo[i] + spacing * np.arange(int(np.floor((hi[i] - lo[i]) / spacing)) + 1) for i in range(3)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return axes, np.stack([x, y, z], axis=-1)


def _sphere_kernels(radius: float, spacing: float, half_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Template (bright ball +1, dark shell -1) and its support weights on a cubic grid.

    Edges are ramps one grid step wide, which keeps the response smooth for sub-voxel peaks.
    """
    offsets = np.arange(-half_width, half_width + 1) * spacing
    dx, dy, dz = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    distance = np.sqrt(dx**2 + dy**2 + dz**2)
    inside = np.clip((radius - distance) / spacing + 0.5, 0.0, 1.0)
    support = np.clip((radius + SHELL_MM - distance) / spacing + 0.5, 0.0, 1.0)
    template = np.where(support > 0, (2.0 * inside - support) / np.maximum(support, 1e-9), 0.0)
    return template, support


class _Correlator:
    """Masked normalised cross-correlation of one image with sphere templates, via FFT.

    Only voxels inside the scanned volume count (Padfield's masked NCC), so a head near the
    edge of a thin coronal slab is still scored on the part that was imaged.
    """

    def __init__(self, image: np.ndarray, inside: np.ndarray, half_width: int, pad: bool = True) -> None:
        # Without padding the borders wrap around: only positions at least ``half_width`` from
        # every edge are valid, which is all a local refinement needs.
        self.shape = image.shape
        self.half_width = half_width
        extra = 2 * half_width if pad else 0
        self.fft_shape = [fft.next_fast_len(n + extra, real=True) for n in image.shape]
        mask = inside.astype(np.float64)
        # NCC ignores gain and offset: standardising the image first keeps the local sums small
        # next to the variances, so single precision (twice as fast) loses nothing that matters.
        values = image[inside] if inside.any() else image.ravel()
        scale = float(values.std()) or 1.0
        masked = ((image - float(values.mean())) / scale * mask).astype(np.float32)
        mask = mask.astype(np.float32)
        self.f_mask = fft.rfftn(mask, self.fft_shape, workers=FFT_THREADS)
        self.f_image = fft.rfftn(masked, self.fft_shape, workers=FFT_THREADS)
        self.f_square = fft.rfftn(masked**2, self.fft_shape, workers=FFT_THREADS)

    def _filter(self, f_signal: np.ndarray, f_kernel: np.ndarray) -> np.ndarray:
        full = fft.irfftn(f_signal * f_kernel, self.fft_shape, workers=FFT_THREADS).astype(np.float64)
        # The kernel's centre sits at index half_width: the "same" output starts there.
        h = self.half_width
        if all(n >= s + h for n, s in zip(self.fft_shape, self.shape, strict=True)):
            return full[h : h + self.shape[0], h : h + self.shape[1], h : h + self.shape[2]]
        full = np.roll(full, (-h, -h, -h), axis=(0, 1, 2))  # unpadded: the tail wraps around
        return full[: self.shape[0], : self.shape[1], : self.shape[2]]

    def ncc(self, radius: float, spacing: float) -> tuple[np.ndarray, np.ndarray]:
        """``(ncc, share of the template support inside the volume)``, maps of the image's shape."""
        template, support = _sphere_kernels(radius, spacing, self.half_width)
        template, support = template.astype(np.float32), support.astype(np.float32)
        f_support = fft.rfftn(support, self.fft_shape, workers=FFT_THREADS)
        f_template = fft.rfftn(support * template, self.fft_shape, workers=FFT_THREADS)
        f_template_sq = fft.rfftn(support * template**2, self.fft_shape, workers=FFT_THREADS)
        count = np.maximum(self._filter(self.f_mask, f_support), 1e-3)
        sum_i = self._filter(self.f_image, f_support)
        sum_ii = self._filter(self.f_square, f_support)
        sum_t = self._filter(self.f_mask, f_template)
        sum_tt = self._filter(self.f_mask, f_template_sq)
        sum_it = self._filter(self.f_image, f_template)
        covariance = sum_it - sum_i * sum_t / count
        var_i = np.maximum(sum_ii - sum_i**2 / count, 0.0)
        var_t = np.maximum(sum_tt - sum_t**2 / count, 0.0)
        product = var_i * var_t
        # Flat patches (no variance) carry no evidence of a sphere.
        flat = product <= 1e-6 * (product.max() + 1e-30)
        ncc = np.where(flat, 0.0, covariance / np.sqrt(np.where(flat, 1.0, product)))
        ncc = np.clip(ncc, -1.0, 1.0)  # rounding can push a near-perfect match past 1
        return ncc, count / support.sum()


def _response(
    volume: Volume, lo: np.ndarray, hi: np.ndarray, spacing: float, radii: np.ndarray, pad: bool = True
) -> tuple[list[np.ndarray], np.ndarray]:
    """NCC per radius on an isotropic grid over ``[lo, hi]``.

    Returns ``(axes, ncc (len(radii), X, Y, Z))``; positions whose template reaches outside the
    volume score -1.
    """
    axes, points = _regular_grid(lo, hi, spacing)
    image, inside = sample_with_mask(volume, points, spacing)
    half_width = int(np.ceil((radii.max() + SHELL_MM) / spacing)) + 1
    correlator = _Correlator(image, inside, half_width, pad=pad)
    stack = np.empty((len(radii), *image.shape), dtype=np.float32)
    for r_index, radius in enumerate(radii):
        ncc, inside_share = correlator.ncc(float(radius), spacing)
        stack[r_index] = np.where(inside_share >= MIN_SUPPORT_INSIDE, ncc, -1.0)
    return axes, stack


def _parabolic_offset(minus: float, centre: float, plus: float) -> float:
    """Sub-step offset of a peak from three samples (in steps, within +-0.5)."""
    curvature = minus - 2.0 * centre + plus
    if curvature >= 0:
        return 0.0
    return float(np.clip(0.5 * (minus - plus) / curvature, -0.5, 0.5))


def _refine_peak(response: np.ndarray, peak: tuple[int, int, int]) -> np.ndarray:
    """Sub-voxel peak position (fractional grid index) by a parabola along each axis."""
    position = np.asarray(peak, dtype=np.float64)
    for axis in range(3):
        if 0 < peak[axis] < response.shape[axis] - 1:
            minus = list(peak)
            plus = list(peak)
            minus[axis] -= 1
            plus[axis] += 1
            position[axis] += _parabolic_offset(response[tuple(minus)], response[peak], response[tuple(plus)])
    return position


def _volume_box(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS bounding box of a volume's voxel centres."""
    shape = np.asarray(volume.pixels.shape) - 1
    corners = np.array(
        [[s, r, c] for s in (0, shape[0]) for r in (0, shape[1]) for c in (0, shape[2])], float
    )
    world = volume.index_to_world(corners)
    return world.min(0), world.max(0)


def localize_femoral_heads(
    volume: Volume, radius_range_mm: tuple[float, float] = (18.0, 30.0)
) -> dict[str, HeadEstimate]:
    """Locate both femoral heads on a pelvic MR (made for the coronal T1: bright marrow, dark rim).

    Method: the volume is resampled (anti-aliased) onto an isotropic 4 mm grid in patient
    coordinates, so the result does not depend on the series' orientation or spacing; a
    template of a bright ball with a 4 mm dark shell is matched by normalised cross-correlation
    (invariant to local gain and offset, hence to bias field) for radii across
    ``radius_range_mm``; the best peak on each side of x = 0 is then re-matched on a local
    1.5 mm grid and refined to sub-voxel precision by parabolas through the response.

    Args:
        volume: an MR volume covering both hips.
        radius_range_mm: ``(min, max)`` femoral-head radii to try.

    Returns:
        ``{"R": HeadEstimate, "L": HeadEstimate}`` (right: x < 0, left: x > 0 in LPS).

    Raises:
        LocalizationError: when a side holds no sphere-like bright structure (NCC below
            ``MIN_NCC``) or the volume does not reach that side.
    """
    r_min, r_max = float(radius_range_mm[0]), float(radius_range_mm[1])
    if not 0 < r_min <= r_max:
        raise ValueError(f"radius_range_mm must be (min, max) with 0 < min <= max, got {radius_range_mm}")
    name = volume.protocol or "the anchor series"
    coarse_radii = np.arange(r_min, r_max + 1e-6, 3.0) if r_max > r_min else np.array([r_min])
    lo, hi = _volume_box(volume)
    axes, stack = _response(volume, lo, hi, SEARCH_SPACING_MM, coarse_radii)
    response, best_radius = stack.max(0), stack.argmax(0)
    x_coords = axes[0][:, None, None]
    estimates: dict[str, HeadEstimate] = {}
    for side, on_side in (("R", x_coords < -MIDLINE_MARGIN_MM), ("L", x_coords > MIDLINE_MARGIN_MM)):
        half = np.where(np.broadcast_to(on_side, response.shape), response, -1.0)
        if half.max() <= -1.0:
            raise LocalizationError(
                f"{name}: the volume does not reach the patient's {'right (x < 0)' if side == 'R' else 'left (x > 0)'} "
                "hip with room for a femoral head; give the centre manually (fh_x_mm, fh_y_mm, fh_z_mm in "
                "labels.csv) or map a series that covers both hips to the anchor protocol."
            )
        peak = np.unravel_index(int(np.argmax(half)), half.shape)
        peak_ncc = float(half[peak])
        if peak_ncc < MIN_NCC:
            raise LocalizationError(
                f"{name}: no femoral-head-like sphere (bright marrow, dark rim, radius {r_min:g}-{r_max:g} mm) on the "
                f"patient's {'right' if side == 'R' else 'left'} side: best match {peak_ncc:.2f} < {MIN_NCC}. "
                "Check that this series is a pelvic T1 covering both hips, or give the centre manually "
                "(fh_x_mm, fh_y_mm, fh_z_mm in labels.csv)."
            )
        coarse_centre = np.array([axes[i][peak[i]] for i in range(3)])
        coarse_radius = float(coarse_radii[best_radius[peak]])
        # Second-best spot in this half, away from the peak, for the confidence.
        squared = [(axis - c) ** 2 for axis, c in zip(axes, coarse_centre, strict=True)]
        far = (
            squared[0][:, None, None] + squared[1][None, :, None] + squared[2][None, None, :]
            > coarse_radius**2
        )
        second = float(np.where(far, half, -1.0).max())
        centre, radius, refined_ncc = _refine(volume, coarse_centre, coarse_radius, (r_min, r_max))
        margin = peak_ncc - max(second, 0.0)
        confidence = float(
            np.clip(refined_ncc, 0.0, 1.0) * np.clip(2.0 * margin / max(peak_ncc, 1e-6), 0.0, 1.0)
        )
        estimates[side] = HeadEstimate(side=side, centre_mm=centre, radius_mm=radius, confidence=confidence)
    return estimates


def _refine(
    volume: Volume, centre: np.ndarray, radius: float, radius_range: tuple[float, float]
) -> tuple[np.ndarray, float, float]:
    """Re-match on a local 1.5 mm grid around a coarse peak; returns ``(centre, radius, ncc)``.

    When the best local match lies on the edge of the search window (a flat or lesioned head
    whose coarse peak is off by more than half a coarse step), the window moves there and the
    match is repeated, at most ``REFINE_MOVES`` times.
    """
    search = 0.5 * SEARCH_SPACING_MM + 3.0  # mm either side: half a coarse step plus slack
    # One coarse radius step either side: on the 4 mm grid the coarse radius can be off by one.
    radii = np.clip(np.arange(radius - 3.0, radius + 3.01, 1.5), radius_range[0], radius_range[1])
    radii = np.unique(radii)
    reach = radii.max() + SHELL_MM + search + 2.0 * REFINE_SPACING_MM
    result = (centre, radius, 0.0)  # kept when the local grid leaves the volume at once
    best_ncc = -np.inf
    for _ in range(REFINE_MOVES + 1):
        axes, stack = _response(volume, centre - reach, centre + reach, REFINE_SPACING_MM, radii, pad=False)
        response, best = stack.max(0), stack.argmax(0)
        # Only the central search window is a valid answer.
        window = [np.abs(a - c) <= search + 1e-6 for a, c in zip(axes, centre, strict=True)]
        mask = window[0][:, None, None] & window[1][None, :, None] & window[2][None, None, :]
        masked = np.where(mask, response, -1.0)
        peak = np.unravel_index(int(np.argmax(masked)), masked.shape)
        if masked[peak] <= -1.0:  # the local grid left the volume; keep the answer so far
            return result
        position = _refine_peak(response, peak)
        refined = np.array([np.interp(position[i], np.arange(len(axes[i])), axes[i]) for i in range(3)])
        r_index = int(best[peak])
        radius_value = float(radii[r_index])
        if 0 < r_index < len(radii) - 1:
            # Radius refined from the NCC of the neighbouring radii at the same spot.
            minus, plus = float(stack[(r_index - 1, *peak)]), float(stack[(r_index + 1, *peak)])
            radius_value += _parabolic_offset(minus, float(masked[peak]), plus) * float(radii[1] - radii[0])
        if float(masked[peak]) <= best_ncc:  # moving did not find a better match
            return result
        best_ncc = float(masked[peak])
        result = (refined, radius_value, best_ncc)
        on_edge = any(abs(axes[i][peak[i]] - centre[i]) > search - REFINE_SPACING_MM + 1e-6 for i in range(3))
        if not on_edge:
            return result
        centre = refined
    return result
