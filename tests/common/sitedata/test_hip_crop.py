"""Hip crop geometry, sampling, normalisation and the per-protocol stack."""

from __future__ import annotations

import numpy as np
import pytest

from common.sitedata.hip_crop import (
    HipCrops,
    crop_hip,
    crop_hip_protocols,
    hip_grid_points,
    normalise_mr,
    sample_points,
)
from common.sitedata.settings import HipGrid, PreprocessSettings
from common.sitedata.volume import Volume
from tests.common.sitedata.test_femoral_head import make_affine

GRID = HipGrid(slices=6, size=16, fov_mm=64.0, slab_mm=30.0)
CENTRE = np.array([-88.0, 4.0, -3.0])


def ramp_volume(orientation: str, spacing=(4.0, 1.0, 1.0), shape=(30, 160, 200), protocol="T1_COR") -> Volume:
    """Volume whose value is the linear function ``1000 + 2x - 3y + 0.5z`` of LPS position."""
    affine = make_affine(orientation, spacing, shape, centre=(-80.0, 0.0, 0.0))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    points = index @ affine[:3, :3].T + affine[:3, 3]
    pixels = ramp(points)
    return Volume(pixels=pixels.astype(np.float32), affine=affine, protocol=protocol)


def ramp(points: np.ndarray) -> np.ndarray:
    return 1000.0 + 2.0 * points[..., 0] - 3.0 * points[..., 1] + 0.5 * points[..., 2]


@pytest.mark.parametrize("orientation", ["COR", "AX", "SAG"])
def test_grid_is_centred_with_the_right_extent(orientation):
    volume = ramp_volume(orientation)
    points = hip_grid_points(volume, CENTRE, GRID, "R")
    assert points.shape == (6, 16, 16, 3)
    np.testing.assert_allclose(points.reshape(-1, 3).mean(0), CENTRE, atol=1e-9)
    # Cell centres: first to last spans (n - 1) cells of fov / n (slab / K through-plane).
    in_plane = np.linalg.norm(points[0, 0, -1] - points[0, 0, 0])
    through = np.linalg.norm(points[-1, 0, 0] - points[0, 0, 0])
    assert in_plane == pytest.approx(64.0 * 15 / 16)
    assert through == pytest.approx(30.0 * 5 / 6)
    # The slice axis follows the volume's slice normal.
    step = points[1, 0, 0] - points[0, 0, 0]
    assert abs(step @ volume.normal) == pytest.approx(5.0)


def test_left_hip_is_mirrored_on_the_x_axis():
    volume = ramp_volume("COR")
    right = hip_grid_points(volume, CENTRE, GRID, "R")
    left = hip_grid_points(volume, CENTRE, GRID, "L")
    # Coronal: columns run along x; for R column 0 is the lateral (most negative x) side.
    assert right[0, 0, 0, 0] < right[0, 0, -1, 0]
    np.testing.assert_allclose(left, right[:, :, ::-1])
    # Sagittal: x is the slice axis, so the slice order flips instead.
    sagittal = ramp_volume("SAG")
    np.testing.assert_allclose(
        hip_grid_points(sagittal, CENTRE, GRID, "L"), hip_grid_points(sagittal, CENTRE, GRID, "R")[::-1]
    )


def test_opposite_storage_order_gives_the_same_grid():
    volume = ramp_volume("COR")
    flipped = Volume(pixels=volume.pixels[::-1, ::-1].copy(), affine=volume.affine.copy(), protocol="T1_COR")
    shape = np.asarray(volume.pixels.shape)
    flipped.affine[:3, :2] *= -1
    flipped.affine[:3, 3] = volume.index_to_world(np.array([shape[0] - 1, shape[1] - 1, 0.0]))
    np.testing.assert_allclose(
        hip_grid_points(flipped, CENTRE, GRID, "R"), hip_grid_points(volume, CENTRE, GRID, "R"), atol=1e-9
    )
    np.testing.assert_allclose(
        crop_hip(flipped, CENTRE, GRID, "R"), crop_hip(volume, CENTRE, GRID, "R"), rtol=1e-4
    )


@pytest.mark.parametrize("orientation", ["COR", "AX", "SAG"])
def test_crop_of_a_linear_ramp_is_exact(orientation):
    volume = ramp_volume(orientation)
    for side in ("R", "L"):
        crop = crop_hip(volume, CENTRE, GRID, side)
        expected = ramp(hip_grid_points(volume, CENTRE, GRID, side))
        assert crop.dtype == np.float32 and crop.shape == (6, 16, 16)
        # Trilinear interpolation and a symmetric prefilter both leave a linear function intact.
        np.testing.assert_allclose(crop, expected, rtol=1e-4)


def test_antialiasing_removes_fine_stripes():
    shape = (40, 200, 200)
    affine = make_affine("COR", (1.0, 0.5, 0.5), shape, centre=CENTRE)
    stripes = np.where((np.arange(shape[2]) // 1) % 2 == 0, 200.0, 0.0)  # one-pixel stripes along x
    volume = Volume(pixels=np.broadcast_to(stripes, shape).astype(np.float32).copy(), affine=affine)
    crop = crop_hip(volume, CENTRE, HipGrid(slices=4, size=16, fov_mm=64.0, slab_mm=20.0), "R")
    # 4 mm output pixels over 0.5 mm stripes: the average (100) with little aliasing left.
    assert abs(float(crop.mean()) - 100.0) < 5.0
    assert float(crop.std()) < 10.0


def test_sample_points_reports_coverage():
    volume = ramp_volume("COR")
    points = hip_grid_points(volume, CENTRE, GRID, "R")
    _, inside = sample_points(volume, points)
    assert inside == 1.0
    values, shifted = sample_points(volume, points + np.array([0.0, 0.0, 200.0]))
    assert shifted == 0.0 and not values.any()


def test_normalise_mr_removes_gain():
    rng = np.random.default_rng(0)
    crop = rng.uniform(100, 400, (4, 16, 16)).astype(np.float32)
    crop[:, :4] = 0.0  # air
    normalised = normalise_mr(crop)
    np.testing.assert_allclose(normalise_mr(crop * 37.0), normalised, rtol=1e-5)
    assert np.median(normalised[:, 4:]) == pytest.approx(1.0, rel=1e-3)
    assert not normalise_mr(np.zeros((2, 8, 8))).any()


def test_protocol_stack_masks_missing_and_uncovered_protocols():
    settings = PreprocessSettings(grid=GRID)
    volumes = {
        "T1_COR": ramp_volume("COR"),
        "T1_AX": ramp_volume("AX", protocol="T1_AX"),
        # A sagittal series over the other hip: the box is outside it.
        "PDFS_SAG": Volume(
            pixels=np.ones((20, 100, 100), np.float32),
            affine=make_affine("SAG", (4.0, 1.0, 1.0), (20, 100, 100), centre=(90.0, 0.0, 0.0)),
            protocol="PDFS_SAG",
        ),
    }
    crops = crop_hip_protocols(volumes, CENTRE, "R", settings)
    assert isinstance(crops, HipCrops)
    image, available, notes = crops
    assert image.shape == (5, 6, 16, 16) and image.dtype == np.float32
    np.testing.assert_array_equal(available, [True, False, True, False, False])
    assert not image[~available].any()
    assert image[0].max() > 0
    assert len(notes) == 1 and notes[0].startswith("PDFS_SAG") and "missing" in notes[0]
