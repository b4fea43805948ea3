"""Femoral-head localisation on analytic pelvis volumes in every orientation, and its failures."""

from __future__ import annotations

import numpy as np
import pytest

from common.sitedata.femoral_head import HeadEstimate, LocalizationError, localize_femoral_heads
from common.sitedata.volume import Volume

# Slice, "down" and "right" directions of the usual display of each orientation.
DIRECTIONS = {
    "COR": ((0, 1.0, 0), (0, 0, -1.0), (1.0, 0, 0)),
    "AX": ((0, 0, 1.0), (0, 1.0, 0), (1.0, 0, 0)),
    "SAG": ((1.0, 0, 0), (0, 0, -1.0), (0, 1.0, 0)),
}


def make_affine(
    orientation: str, spacing: tuple[float, float, float], shape, centre=(0.0, 0.0, 0.0)
) -> np.ndarray:
    """Index -> LPS affine of a grid of ``shape`` centred on ``centre``."""
    affine = np.eye(4)
    for axis, direction in enumerate(DIRECTIONS[orientation]):
        affine[:3, axis] = np.asarray(direction) * spacing[axis]
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def t1_pelvis(points: np.ndarray, centres: list[np.ndarray], radius: float) -> np.ndarray:
    """T1-like analytic pelvis: fat, muscle, femoral heads (bright marrow, dark rim, cartilage,
    acetabulum above) and necks, evaluated at ``(..., 3)`` LPS points."""
    x, y = points[..., 0], points[..., 1]
    image = np.zeros(points.shape[:-1], np.float32)
    image[(x / 170) ** 2 + (y / 120) ** 2 < 1] = 600.0  # subcutaneous fat
    image[(x / 150) ** 2 + (y / 100) ** 2 < 1] = 300.0  # muscle
    for centre in centres:
        distance = np.linalg.norm(points - centre, axis=-1)
        above = points[..., 2] - centre[2] > -5
        neck_axis = np.array([np.sign(centre[0]) * 0.6, 0.0, -0.8])
        along = (points - centre) @ neck_axis
        across = np.linalg.norm(points - centre - along[..., None] * neck_axis, axis=-1)
        neck = (along > 0) & (along < 70) & (across < 0.6 * radius)
        image[neck] = 60.0
        image[neck & (across < 0.6 * radius - 2)] = 780.0
        image[(distance >= radius + 3.5) & (distance < radius + 14) & above] = 700.0  # acetabular marrow
        image[(distance >= radius + 3.5) & (distance < radius + 5) & above] = 50.0  # acetabular cortex
        image[(distance >= radius + 1.5) & (distance < radius + 3.5)] = 350.0  # cartilage
        image[(distance >= radius) & (distance < radius + 1.5)] = 60.0  # cortex
        image[distance < radius] = 800.0  # fatty marrow
    return image


def make_pelvis(
    orientation: str,
    spacing: tuple[float, float, float],
    centres: list[np.ndarray],
    radius: float = 24.0,
    extent_mm: tuple[float, float, float] = (360.0, 100.0, 120.0),
    seed: int = 0,
    gain: float = 1.0,
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Volume:
    """An MR volume of the analytic pelvis with bias field and noise; extent is (x, y, z) mm."""
    rng = np.random.default_rng(seed)
    axis_of = [int(np.argmax(np.abs(d))) for d in DIRECTIONS[orientation]]
    shape = tuple(int(round(extent_mm[a] / s)) for a, s in zip(axis_of, spacing, strict=True))
    affine = make_affine(orientation, spacing, shape, centre_mm)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    points = index @ affine[:3, :3].T + affine[:3, 3]
    image = t1_pelvis(points, centres, radius)
    image *= 1 + 0.3 * points[..., 0] / 200 + 0.2 * points[..., 2] / 100  # bias field
    image = np.abs(image + rng.normal(0, 20.0, image.shape)) * gain
    return Volume(pixels=image.astype(np.float32), affine=affine, modality="MR", protocol="T1_COR")


HEAD_R = np.array([-90.4, 3.2, 2.7])
HEAD_L = np.array([88.3, 1.1, 4.6])


@pytest.mark.parametrize(
    "orientation, spacing",
    [("COR", (4.0, 1.0, 1.0)), ("AX", (5.0, 1.1, 1.1)), ("SAG", (3.5, 1.2, 0.9))],
)
def test_finds_both_heads_in_every_orientation(orientation, spacing):
    volume = make_pelvis(orientation, spacing, [HEAD_R, HEAD_L], radius=23.4, gain=7.0)
    heads = localize_femoral_heads(volume)
    assert set(heads) == {"L", "R"}
    for side, truth in (("R", HEAD_R), ("L", HEAD_L)):
        estimate = heads[side]
        assert isinstance(estimate, HeadEstimate) and estimate.side == side
        assert np.linalg.norm(estimate.centre_mm - truth) < 1.0
        assert abs(estimate.radius_mm - 23.4) < 2.0
        assert 0.5 < estimate.confidence <= 1.0


def test_sides_follow_lps_x():
    """The patient's left is x > 0 regardless of where the image's columns run."""
    volume = make_pelvis("COR", (4.0, 1.2, 1.2), [HEAD_R, HEAD_L], radius=24.0)
    volume.affine[:3, 2] *= -1  # columns run to the patient's right now
    volume.affine[:3, 3] = -volume.affine[:3, :3] @ ((np.asarray(volume.pixels.shape) - 1) / 2.0)
    heads = localize_femoral_heads(volume)
    # The same pixels now put the anatomy mirrored: each head appears on the other side.
    assert heads["L"].centre_mm[0] > 0 and heads["R"].centre_mm[0] < 0
    assert np.linalg.norm(heads["L"].centre_mm - HEAD_R * [-1, 1, 1]) < 1.0


def test_pure_noise_raises_clear_error():
    rng = np.random.default_rng(3)
    shape = (25, 100, 300)
    volume = Volume(
        pixels=rng.normal(500, 50, shape).astype(np.float32),
        affine=make_affine("COR", (4.0, 1.2, 1.2), shape),
        protocol="T1_COR",
    )
    with pytest.raises(LocalizationError, match="T1_COR.*no femoral-head-like sphere"):
        localize_femoral_heads(volume)


def test_volume_covering_one_hip_only_raises():
    volume = make_pelvis(
        "COR", (4.0, 1.2, 1.2), [HEAD_R, HEAD_L], extent_mm=(150.0, 100.0, 120.0), centre_mm=(-90.0, 0.0, 0.0)
    )  # field of view over the right hip only
    with pytest.raises(LocalizationError, match="left"):
        localize_femoral_heads(volume)


def test_rejects_bad_radius_range():
    volume = make_pelvis("COR", (4.0, 1.5, 1.5), [HEAD_R, HEAD_L])
    with pytest.raises(ValueError, match="radius_range_mm"):
        localize_femoral_heads(volume, radius_range_mm=(30.0, 18.0))


@pytest.fixture(scope="module")
def synthetic_site(tmp_path_factory):
    """A tiny synthetic hospital written as DICOM by ``simulation.synth``, read back by
    ``common.sitedata.dicom``: ``(scan, truth by patient id)``."""
    import json

    from common.sitedata.dicom import scan_site
    from simulation.synth.federation import generate_federation

    out = generate_federation(
        tmp_path_factory.mktemp("federation"), sites=1, patients=3, seed=0, size="tiny", workers=1
    )
    truth = {t["patient_id"]: t for t in json.loads((out / "site-00.truth.json").read_text())}
    return scan_site(out / "site-00"), truth


def test_phantom_heads_found_within_target(synthetic_site):
    from common.sitedata.dicom import load_volume

    scan, truth = synthetic_site
    errors = []
    for patient_id, patient in scan.patients.items():
        heads = localize_femoral_heads(load_volume(patient.series["T1_COR"]))
        for side in ("L", "R"):
            true_centre = np.asarray(truth[patient_id]["hips"][side]["centre_mm"])
            errors.append(np.linalg.norm(heads[side].centre_mm - true_centre))
            assert heads[side].confidence > 0.2
    assert len(errors) == 6
    assert np.median(errors) <= 2.0 and max(errors) <= 4.0
