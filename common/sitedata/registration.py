"""Rigid MR-CT registration around the femoral heads, and MR/CT slice pairs for translation training."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from common.sitedata.hip_crop import (
    antialias_sigma,
    crop_coverage,
    hip_grid_points,
    normalise_mr,
    sample_points,
    sub_volume,
    world_to_index,
)
from common.sitedata.settings import PreprocessSettings
from common.sitedata.volume import Volume

# Coarse-to-fine levels: (grid spacing mm, share of the iterations, Adam step in mm, MR points).
# The first level does the capture (up to ~10 mm / 4 degrees) on few points; the second refines
# with a step that decays, so it settles instead of oscillating at the step size.
LEVELS: tuple[tuple[float, float, float, int], ...] = ((4.0, 0.5, 1.0, 3000), (2.0, 0.5, 0.3, 5000))
REGION_HALF_MM = 45.0  # half-size of the cube around each femoral head that drives the fit
PATIENCE = 8  # a level stops after this many steps without a better loss
ROTATION_ARM_MM = 50.0  # rotation parameters are scaled to mm of arc at this distance
CT_MI_WINDOW_HU = (-250.0, 1250.0)  # CT window mapped to [0, 1] for mutual information
MI_BINS = 24  # Parzen bins of the joint histogram
MI_SMOOTH = 1e-7  # keeps the log finite on empty bins (MONAI's smooth_nr / smooth_dr)
MIN_CT_COVERAGE = 0.8  # share of a crop's points that must map inside the CT


@dataclass
class RegistrationResult:
    """Outcome of ``register_rigid``.

    Attributes:
        matrix: float64 ``(4, 4)`` mapping fixed (MR-session) LPS points to moving (CT-session)
            LPS points: ``ct_point = matrix @ [mr_point, 1]``.
        final_loss: negative mutual information at the end (lower is better).
        translation_mm: ``(3,)`` the matrix's translation at the region centre, i.e. where the
            region centre moves to, minus the region centre.
        rotation_deg: rotation angle of the matrix in degrees.
    """

    matrix: np.ndarray
    final_loss: float
    translation_mm: np.ndarray
    rotation_deg: float


def _rotation(rotation_vector: torch.Tensor) -> torch.Tensor:
    """Rotation matrix ``(3, 3)`` from an axis-angle vector in radians (differentiable)."""
    zero = rotation_vector.new_zeros(())
    wx, wy, wz = rotation_vector
    skew = torch.stack(
        [torch.stack([zero, -wz, wy]), torch.stack([wz, zero, -wx]), torch.stack([-wy, wx, zero])]
    )
    return torch.linalg.matrix_exp(skew)


def _matrix(params: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """4x4 rigid matrix from ``params = (translation mm, rotation as mm of arc)``, about ``centre``."""
    rotation = _rotation(params[3:] / ROTATION_ARM_MM)
    translation = centre + params[:3] - rotation @ centre
    top = torch.cat([rotation, translation[:, None]], dim=1)
    bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=params.dtype)
    return torch.cat([top, bottom], dim=0)


def _region_points(fixed: Volume, centres_mm: list[np.ndarray] | None, spacing: float) -> np.ndarray:
    """``(N, 3)`` LPS points on a regular grid: cubes around the heads, or the whole volume."""
    if centres_mm:
        boxes = [
            (np.asarray(c, float) - REGION_HALF_MM, np.asarray(c, float) + REGION_HALF_MM) for c in centres_mm
        ]
    else:
        shape = np.asarray(fixed.pixels.shape) - 1
        corners = np.array(
            [[s, r, c] for s in (0, shape[0]) for r in (0, shape[1]) for c in (0, shape[2])], float
        )
        world = fixed.index_to_world(corners)
        boxes = [(world.min(0), world.max(0))]
    # One grid over all boxes, keeping the points that fall in any of them (no duplicates).
    low = np.min([lo for lo, _ in boxes], axis=0)
    high = np.max([hi for _, hi in boxes], axis=0)
    axes = [np.arange(low[i], high[i] + 1e-6, spacing) for i in range(3)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    in_box = np.zeros(len(points), dtype=bool)
    for lo, hi in boxes:
        in_box |= np.all((points >= lo - 1e-6) & (points <= hi + 1e-6), axis=1)
    points = points[in_box]
    index = world_to_index(fixed, points)
    inside = np.all((index >= 0) & (index <= np.asarray(fixed.pixels.shape) - 1), axis=1)
    return points[inside]


def _unit_interval_mr(values: np.ndarray) -> np.ndarray:
    """MR values to [0, 1] by their 1st and 99th percentiles (mutual information needs a range)."""
    lo, hi = np.percentile(values, [1.0, 99.0])
    return np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _unit_interval_ct(values: np.ndarray | torch.Tensor):
    lo, hi = CT_MI_WINDOW_HU
    return ((values - lo) / (hi - lo)).clip(0.0, 1.0)


class _MovingCT:
    """A CT block (smoothed for one level) sampled in torch at LPS points."""

    def __init__(self, ct: Volume, points_mm: np.ndarray, spacing: float, margin_mm: float) -> None:
        region = sub_volume(ct, points_mm, margin_mm)
        if region is None:
            raise ValueError(
                "register_rigid: the CT series does not overlap the MR region around the femoral heads; "
                "check that the CT covers the hips"
            )
        sigma = antialias_sigma(region.spacing, np.full(3, spacing))
        smoothed = ndimage.gaussian_filter(region.pixels.astype(np.float32), sigma, mode="nearest")
        self.pixels = torch.from_numpy(_unit_interval_ct(smoothed).astype(np.float32))[None, None]
        self.inverse = torch.from_numpy(np.linalg.inv(region.affine))
        self.shape = torch.tensor(region.pixels.shape, dtype=torch.float64)

    def sample(self, points: torch.Tensor) -> torch.Tensor:
        """Trilinear values at ``(N, 3)`` LPS points (float64), edge values outside; ``(N,)``."""
        index = points @ self.inverse[:3, :3].T + self.inverse[:3, 3]
        normalised = 2.0 * index / (self.shape - 1.0) - 1.0
        # grid_sample wants (x, y, z) = (column, row, slice).
        grid = normalised.flip(-1).to(torch.float32)[None, None, None]
        values = F.grid_sample(self.pixels, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return values.reshape(-1)


def register_rigid(
    fixed_mr: Volume,
    moving_ct: Volume,
    centres_mm: list[np.ndarray] | None = None,
    max_iters: int = 120,
    seed: int = 0,
) -> RegistrationResult:
    """Rigidly register a CT to an MR of the same patient by mutual information.

    Starts from the DICOM geometry (identity in patient coordinates) and optimises six rigid
    parameters (translation, rotation about the region centre) with Adam on two levels: 4 mm
    (3,000 MR points, capture) then 2 mm (5,000 points, refinement), the CT anti-aliased to each
    level, the step decaying over each level, and a level ending early once the loss has not
    improved for ``PATIENCE`` steps. The loss is gaussian-Parzen mutual information (MONAI's
    ``GlobalMutualInformationLoss`` estimator) on a fixed random subset of the MR points.

    Args:
        fixed_mr: the anchor MR (coronal T1), MR-session LPS.
        moving_ct: the CT, CT-session LPS (Hounsfield units).
        centres_mm: femoral-head centres (MR session); the fit then uses cubes of
            ``2 * REGION_HALF_MM`` around them, where accuracy matters. ``None``: the whole MR.
        max_iters: optimiser steps over all levels.
        seed: seed of the point subsets.

    Returns:
        ``RegistrationResult`` whose ``matrix`` maps MR-session points to CT-session points.
    """
    if max_iters < 2:
        raise ValueError(f"register_rigid: max_iters must be >= 2, got {max_iters}")
    # A few thousand points per step: one thread is as fast, and several threads slow down
    # many-fold when the CPU is shared (site daemons, data-loader workers).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _register(fixed_mr, moving_ct, centres_mm, max_iters, seed)
    finally:
        torch.set_num_threads(threads)


class _FixedImageMI:
    """Negative mutual information against a fixed sample set, with gaussian Parzen windows.

    The estimator of MONAI's ``GlobalMutualInformationLoss`` (gaussian kernel, DeepReg's
    formulation: 24 bins on [0, 1], sigma half a bin spacing, per-sample weights normalised over
    the bins, ``1e-7`` smoothing), written out for two reasons: the MR side never changes during
    a registration, so its weights are computed once instead of at every step (half the work),
    and importing MONAI costs 3-5 s in every fresh worker process.
    """

    def __init__(self, fixed: torch.Tensor) -> None:
        self.centres = torch.linspace(0.0, 1.0, MI_BINS, dtype=torch.float32)
        sigma = float(self.centres[1] - self.centres[0]) * 0.5
        self.preterm = 1.0 / (2.0 * sigma**2)
        weight = self._windows(fixed)  # (N, bins)
        self.fixed_weight_t = weight.T.contiguous()  # (bins, N)
        self.fixed_probability = weight.mean(0)  # (bins,)
        self.count = weight.shape[0]

    def _windows(self, values: torch.Tensor) -> torch.Tensor:
        """``(N,)`` values in [0, 1] -> ``(N, bins)`` Parzen weights, each row summing to 1."""
        weight = torch.exp(-self.preterm * (values.reshape(-1, 1).clamp(0.0, 1.0) - self.centres) ** 2)
        return weight / weight.sum(1, keepdim=True)

    def __call__(self, moving: torch.Tensor) -> torch.Tensor:
        weight = self._windows(moving)
        joint = (self.fixed_weight_t @ weight) / self.count  # (bins, bins)
        independent = self.fixed_probability[:, None] * weight.mean(0)[None, :]
        ratio = (joint + MI_SMOOTH) / (independent + MI_SMOOTH) + MI_SMOOTH
        return -(joint * torch.log(ratio)).sum()


class _Adam:
    """Adam (Kingma & Ba) on one parameter tensor, with a step size set per call.

    Written out because six parameters need nothing more, and ``torch.optim`` imports
    ``torch._dynamo`` on first use: about 2.5 s in every fresh worker process.
    """

    def __init__(self, params: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = params
        self.betas = betas
        self.eps = eps
        self.first = torch.zeros_like(params)
        self.second = torch.zeros_like(params)
        self.steps = 0

    def step(self, lr: float) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        with torch.no_grad():
            grad = self.params.grad
            self.first.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            self.second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            first = self.first / (1.0 - beta1**self.steps)
            second = self.second / (1.0 - beta2**self.steps)
            self.params.sub_(lr * first / (second.sqrt() + self.eps))
            self.params.grad = None


def _register(
    fixed_mr: Volume, moving_ct: Volume, centres_mm: list[np.ndarray] | None, max_iters: int, seed: int
) -> RegistrationResult:
    """``register_rigid`` without the thread setting."""
    rng = np.random.default_rng(seed)
    params = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    region_centre = None
    final_loss = float("nan")
    for spacing, share, step, max_points in LEVELS:
        points = _region_points(fixed_mr, centres_mm, spacing)
        if len(points) < 100:
            raise ValueError(
                "register_rigid: too few MR points in the registration region; check the femoral-head "
                "centres and that the anchor MR covers the hips"
            )
        if region_centre is None:
            region_centre = torch.from_numpy(points.mean(0))
        if len(points) > max_points:
            points = points[rng.choice(len(points), max_points, replace=False)]
        fixed_values, _ = sample_points(fixed_mr, points, spacing)
        loss_fn = _FixedImageMI(torch.from_numpy(_unit_interval_mr(fixed_values).astype(np.float32)))
        moving = _MovingCT(moving_ct, points, spacing, margin_mm=30.0)
        points_tensor = torch.from_numpy(points)
        optimiser = _Adam(params)  # fresh moments per level, as the step size changes
        iterations = max(1, int(round(max_iters * share)))
        best, since_best = float("inf"), 0
        for iteration in range(iterations):
            matrix = _matrix(params, region_centre)
            mapped = points_tensor @ matrix[:3, :3].T + matrix[:3, 3]
            loss = loss_fn(moving.sample(mapped))
            loss.backward()
            final_loss = float(loss.detach())
            # Cosine decay of the step over the level: large moves first, then settle.
            optimiser.step(step * (0.55 + 0.45 * np.cos(np.pi * iteration / iterations)))
            if final_loss < best - 1e-5:
                best, since_best = final_loss, 0
            else:
                since_best += 1
                if since_best >= PATIENCE:
                    break
    with torch.no_grad():
        matrix = _matrix(params, region_centre).numpy()
    angle = float(np.degrees(np.linalg.norm(params.detach().numpy()[3:]) / ROTATION_ARM_MM))
    centre = region_centre.numpy()
    translation = matrix[:3, :3] @ centre + matrix[:3, 3] - centre
    return RegistrationResult(
        matrix=matrix, final_loss=final_loss, translation_mm=translation, rotation_deg=angle
    )


def normalise_ct(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Hounsfield units to [-1, 1]: ``window[0]`` -> -1, ``window[1]`` -> 1, clipped; float32."""
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        raise ValueError(f"ct_window_hu must be (low, high) with low < high, got {window}")
    return np.clip(2.0 * (np.asarray(hu, dtype=np.float32) - lo) / (hi - lo) - 1.0, -1.0, 1.0).astype(
        np.float32
    )


def denormalise_ct(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Inverse of ``normalise_ct`` (within the window): [-1, 1] back to Hounsfield units."""
    lo, hi = float(window[0]), float(window[1])
    return ((np.asarray(values, dtype=np.float32) + 1.0) * 0.5 * (hi - lo) + lo).astype(np.float32)


def ct_pairs_for_hip(
    mr_volumes: dict[str, Volume],
    ct: Volume,
    matrix: np.ndarray,
    centre_mm: np.ndarray,
    side: str,
    settings: PreprocessSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """Paired MR and CT slices of one hip, in each MR protocol's crop geometry.

    For every protocol of ``settings.protocols`` present in ``mr_volumes`` whose volume covers the
    hip box (``crop_hip_protocols``'s rule) and whose box maps inside the CT: the normalised MR
    crop (``normalise_mr``) and the CT sampled at ``matrix @ point`` for the same points,
    anti-aliased and mapped by ``normalise_ct`` with ``settings.ct_window_hu``.

    Args:
        mr_volumes: protocol key -> MR volume (MR session).
        ct: the CT volume (CT session, HU).
        matrix: ``(4, 4)`` MR-session -> CT-session LPS (``RegistrationResult.matrix``).
        centre_mm: ``(3,)`` femoral-head centre, MR session.
        side: ``"R"`` or ``"L"`` (mirrored as in ``hip_grid_points``).
        settings: protocols, crop grid and CT window.

    Returns:
        ``(mr (N, H, W), ct (N, H, W))`` float32 with N = K x the number of protocols used; MR in
        ``normalise_mr`` units, CT in [-1, 1]. Both empty ``(0, H, W)`` when none qualifies.
    """
    grid = settings.grid
    matrix = np.asarray(matrix, dtype=np.float64)
    mr_parts, ct_parts = [], []
    for protocol in settings.protocols:
        volume = mr_volumes.get(protocol)
        if volume is None or crop_coverage(volume, centre_mm, grid, side) < 0.8:
            continue
        points = hip_grid_points(volume, centre_mm, grid, side)
        mr_values, _ = sample_points(volume, points)
        ct_points = sum(points[..., i : i + 1] * matrix[:3, i] for i in range(3)) + matrix[:3, 3]
        ct_values, ct_share = sample_points(ct, ct_points)
        if ct_share < MIN_CT_COVERAGE:
            continue
        mr_parts.append(normalise_mr(mr_values))
        ct_parts.append(normalise_ct(ct_values, settings.ct_window_hu))
    if not mr_parts:
        empty = np.zeros((0, grid.size, grid.size), dtype=np.float32)
        return empty, empty.copy()
    return np.concatenate(mr_parts).astype(np.float32), np.concatenate(ct_parts).astype(np.float32)
