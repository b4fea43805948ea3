"""Rigid MR-CT registration on an analytic pelvis with a known offset, and MR/CT slice pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from common.sitedata.registration import (
    RegistrationResult,
    _FixedImageMI,
    ct_pairs_for_hip,
    denormalise_ct,
    normalise_ct,
    register_rigid,
)
from common.sitedata.settings import HipGrid, PreprocessSettings
from common.sitedata.volume import Volume
from tests.common.sitedata.test_femoral_head import make_affine, make_pelvis

HEADS = [np.array([-89.0, 3.0, 1.0]), np.array([91.0, 0.0, 3.0])]
RADIUS = 23.0


def ct_pelvis(points: np.ndarray, centres: list[np.ndarray], radius: float) -> np.ndarray:
    """Hounsfield units of the same analytic pelvis as ``t1_pelvis`` (bone bright, fat dark)."""
    x, y = points[..., 0], points[..., 1]
    hu = np.full(points.shape[:-1], -1000.0, np.float32)
    hu[(x / 170) ** 2 + (y / 120) ** 2 < 1] = -100.0
    hu[(x / 150) ** 2 + (y / 100) ** 2 < 1] = 50.0
    for centre in centres:
        distance = np.linalg.norm(points - centre, axis=-1)
        above = points[..., 2] - centre[2] > -5
        neck_axis = np.array([np.sign(centre[0]) * 0.6, 0.0, -0.8])
        along = (points - centre) @ neck_axis
        across = np.linalg.norm(points - centre - along[..., None] * neck_axis, axis=-1)
        neck = (along > 0) & (along < 70) & (across < 0.6 * radius)
        hu[neck] = 1100.0
        hu[neck & (across < 0.6 * radius - 2)] = 250.0
        hu[(distance >= radius + 3.5) & (distance < radius + 14) & above] = 300.0
        hu[(distance >= radius + 3.5) & (distance < radius + 5) & above] = 1200.0
        hu[(distance >= radius + 1.5) & (distance < radius + 3.5)] = 90.0
        hu[(distance >= radius) & (distance < radius + 1.5)] = 1300.0
        hu[distance < radius] = 280.0
    return hu


def known_offset(translation_mm, rotation_deg, axis) -> np.ndarray:
    """4x4 rigid matrix, MR-session -> CT-session points."""
    matrix = np.eye(4)
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    matrix[:3, :3] = Rotation.from_rotvec(axis * np.radians(rotation_deg)).as_matrix()
    matrix[:3, 3] = translation_mm
    return matrix


def make_ct(offset: np.ndarray, spacing=(2.5, 1.5, 1.5), extent_mm=(320.0, 150.0, 150.0), seed=1) -> Volume:
    """Axial CT in CT-session LPS: the anatomy at CT point q is at MR point ``inv(offset) q``."""
    rng = np.random.default_rng(seed)
    shape = (int(extent_mm[2] / spacing[0]), int(extent_mm[1] / spacing[1]), int(extent_mm[0] / spacing[2]))
    affine = make_affine("AX", spacing, shape, centre=(0.0, 0.0, 5.0))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    points = index @ affine[:3, :3].T + affine[:3, 3]
    inverse = np.linalg.inv(offset)
    anatomy = points @ inverse[:3, :3].T + inverse[:3, 3]
    hu = ct_pelvis(anatomy, HEADS, RADIUS) + rng.normal(0.0, 12.0, shape)
    return Volume(pixels=hu.astype(np.float32), affine=affine, modality="CT", protocol="CT")


def mean_error_near_heads(estimated: np.ndarray, truth: np.ndarray) -> float:
    """Mean displacement difference (mm) of points within 30 mm of each head centre."""
    rng = np.random.default_rng(0)
    errors = []
    for centre in HEADS:
        points = centre + rng.uniform(-30, 30, (3000, 3))
        points = points[np.linalg.norm(points - centre, axis=1) < 30]
        a = points @ estimated[:3, :3].T + estimated[:3, 3]
        b = points @ truth[:3, :3].T + truth[:3, 3]
        errors.append(np.linalg.norm(a - b, axis=1).mean())
    return float(np.mean(errors))


@pytest.fixture(scope="module")
def mr() -> Volume:
    return make_pelvis(
        "COR", (4.0, 1.5, 1.5), HEADS, radius=RADIUS, extent_mm=(330.0, 100.0, 140.0), gain=5.0
    )


def test_recovers_a_known_rigid_offset(mr):
    truth = known_offset([6.0, -4.0, 5.0], 3.5, axis=[0.3, 1.0, 0.5])
    ct = make_ct(truth)
    assert mean_error_near_heads(np.eye(4), truth) > 6.0
    result = register_rigid(mr, ct, centres_mm=HEADS)
    assert isinstance(result, RegistrationResult)
    assert result.matrix.shape == (4, 4)
    np.testing.assert_allclose(result.matrix[:3, :3] @ result.matrix[:3, :3].T, np.eye(3), atol=1e-6)
    assert mean_error_near_heads(result.matrix, truth) < 1.5
    assert result.rotation_deg == pytest.approx(3.5, abs=1.0)
    assert np.isfinite(result.final_loss) and result.final_loss < 0


def test_identity_stays_identity(mr):
    ct = make_ct(np.eye(4))
    result = register_rigid(mr, ct, centres_mm=HEADS, max_iters=60)
    assert mean_error_near_heads(result.matrix, np.eye(4)) < 1.0


def test_mutual_information_is_monais_estimator():
    """The loss with cached MR windows gives MONAI's GlobalMutualInformationLoss, value and gradient."""
    from monai.losses import GlobalMutualInformationLoss

    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(4000, generator=generator)
    moving = (0.7 * fixed + 0.3 * torch.rand(4000, generator=generator)).requires_grad_(True)
    reference = GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=24, sigma_ratio=0.5)
    expected = reference(moving[None, None], fixed[None, None])
    (expected_grad,) = torch.autograd.grad(expected, moving)
    loss = _FixedImageMI(fixed)(moving)
    (grad,) = torch.autograd.grad(loss, moving)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-8)
    # Unrelated images share less information than related ones.
    assert float(_FixedImageMI(fixed)(torch.rand(4000, generator=generator))) > float(loss)


def test_ct_normalisation_round_trip():
    window = (-200.0, 1400.0)
    hu = np.array([-1000.0, -200.0, 600.0, 1400.0, 3000.0])
    normalised = normalise_ct(hu, window)
    np.testing.assert_allclose(normalised, [-1.0, -1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(denormalise_ct(normalised[1:4], window), hu[1:4])
    with pytest.raises(ValueError, match="ct_window_hu"):
        normalise_ct(hu, (100.0, 100.0))


def test_slice_pairs_follow_the_matrix(mr):
    truth = known_offset([5.0, 2.0, -3.0], 2.0, axis=[0.0, 0.0, 1.0])
    ct = make_ct(truth)
    grid = HipGrid(slices=4, size=24, fov_mm=64.0, slab_mm=24.0)
    settings = PreprocessSettings(grid=grid)
    volumes = {"T1_COR": mr, "T1_AX": make_pelvis("AX", (5.0, 1.5, 1.5), HEADS, radius=RADIUS)}
    mr_slices, ct_slices = ct_pairs_for_hip(volumes, ct, truth, HEADS[0], "R", settings)
    assert mr_slices.shape == ct_slices.shape == (8, 24, 24)
    assert mr_slices.dtype == ct_slices.dtype == np.float32
    assert ct_slices.min() >= -1.0 and ct_slices.max() <= 1.0
    # With the true matrix, the CT shows the femoral head where the MR does: marrow (bright on
    # T1) at the centre pixel, about 280 HU on CT.
    centre_hu = denormalise_ct(ct_slices[:, 12, 12], settings.ct_window_hu)
    np.testing.assert_allclose(centre_hu[[1, 2, 5, 6]], 280.0, atol=40.0)
    # Bright MR and dense CT go together over the crop (same anatomy, other contrast).
    bone = ct_slices > normalise_ct(np.array([700.0]), settings.ct_window_hu)[0]
    assert mr_slices[bone].mean() < mr_slices[~bone].mean()  # cortex is dark on T1
    # With the identity instead, the pairs disagree more: CT-vs-MR structure moves.
    _, wrong = ct_pairs_for_hip(volumes, ct, np.eye(4), HEADS[0], "R", settings)
    assert np.abs(wrong - ct_slices).mean() > 0.05


def test_pairs_skip_missing_protocols(mr):
    settings = PreprocessSettings(grid=HipGrid(slices=4, size=16, fov_mm=64.0, slab_mm=24.0))
    ct = make_ct(np.eye(4))
    mr_slices, ct_slices = ct_pairs_for_hip({}, ct, np.eye(4), HEADS[0], "R", settings)
    assert mr_slices.shape == ct_slices.shape == (0, 16, 16)
    mr_slices, _ = ct_pairs_for_hip({"T1_COR": mr}, ct, np.eye(4), HEADS[1], "L", settings)
    assert mr_slices.shape == (4, 16, 16)


@pytest.mark.slow
def test_phantom_ct_offset_recovered(tmp_path):
    """DICOM written by ``simulation.synth``: the estimated MR->CT matrix matches the truth."""
    import json

    from common.sitedata.dicom import load_volume, scan_site
    from common.sitedata.femoral_head import localize_femoral_heads
    from simulation.synth.federation import generate_federation

    out = generate_federation(tmp_path / "federation", sites=1, patients=3, seed=0, size="tiny", workers=1)
    truth = {t["patient_id"]: t for t in json.loads((out / "site-00.truth.json").read_text())}
    settings = PreprocessSettings()
    checked = 0
    for patient_id, patient in scan_site(out / "site-00").patients.items():
        offset = truth[patient_id]["ct_offset"]
        if offset is None:
            continue
        mr = load_volume(patient.series["T1_COR"])
        ct = load_volume(patient.series["CT"])
        heads = localize_femoral_heads(mr)
        result = register_rigid(mr, ct, centres_mm=[heads["R"].centre_mm, heads["L"].centre_mm])
        true_matrix = np.asarray(offset["matrix"])
        rng = np.random.default_rng(0)
        for side in ("L", "R"):
            centre = np.asarray(truth[patient_id]["hips"][side]["centre_mm"])
            points = centre + rng.uniform(-30, 30, (3000, 3))
            points = points[np.linalg.norm(points - centre, axis=1) < 30]
            estimated = points @ result.matrix[:3, :3].T + result.matrix[:3, 3]
            expected = points @ true_matrix[:3, :3].T + true_matrix[:3, 3]
            assert np.linalg.norm(estimated - expected, axis=1).mean() <= 1.5
        mr_slices, ct_slices = ct_pairs_for_hip(
            {"T1_COR": mr}, ct, result.matrix, heads["R"].centre_mm, "R", settings
        )
        assert (
            mr_slices.shape
            == ct_slices.shape
            == (settings.grid.slices, settings.grid.size, settings.grid.size)
        )
        checked += 1
    assert checked >= 1
