"""Tests of the phantom: tissue signals, anatomy placement and ARCO stage cues on MR and CT."""

from __future__ import annotations

import numpy as np
import pytest

from simulation.phantom.anatomy import Patient, head_sdf, make_patient
from simulation.phantom.layers import patient_layers
from simulation.phantom.render import Grid, Scanner, TissueMap, mr_image
from simulation.phantom.tissues import MR_PROTOCOLS, TISSUE_INDEX, ct_values, spin_echo_signal


def _signal(protocol: str, tissue: str) -> float:
    return float(spin_echo_signal(MR_PROTOCOLS[protocol])[TISSUE_INDEX[tissue]])


def test_t1_contrast_fat_bright_fluid_dark():
    assert (
        _signal("T1_COR", "subcutaneous_fat") > _signal("T1_COR", "muscle") > _signal("T1_COR", "joint_fluid")
    )
    assert _signal("T1_COR", "fatty_marrow") > 2 * _signal("T1_COR", "reactive_band")


@pytest.mark.parametrize("protocol", ["T2W_COR", "T2W_AX", "PDFS_SAG"])
def test_fat_suppressed_protocols_suppress_fat(protocol):
    fat = _signal(protocol, "subcutaneous_fat")
    assert fat < 0.15 * _signal("T1_COR", "subcutaneous_fat")
    assert fat < 0.2 * _signal(protocol, "joint_fluid")
    # Oedema and the granulation line of the double-line sign are bright against fatty marrow.
    assert _signal(protocol, "marrow_oedema") > 3 * _signal(protocol, "fatty_marrow")
    assert _signal(protocol, "granulation") > _signal(protocol, "sclerosis")


def _iso_grid(centre: np.ndarray, half_mm: float, spacing: float) -> Grid:
    n = int(round(2 * half_mm / spacing)) + 1
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(centre) - half_mm
    return Grid(affine, (n, n, n), spacing)


def _hip_ct(patient: Patient, side: str, spacing: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free CT around one head and each voxel's distance to the head centre."""
    hip = patient.hips[side]
    tissue_map = TissueMap(patient_layers(patient), _iso_grid(hip.centre, 32.0, spacing))
    hu = tissue_map.render(ct_values())
    x, y, z = tissue_map.coordinates()
    distance = np.sqrt((x - hip.centre[0]) ** 2 + (y - hip.centre[1]) ** 2 + (z - hip.centre[2]) ** 2)
    return hu, distance


def test_head_sits_at_its_centre_with_the_given_radius():
    patient = make_patient(np.random.default_rng(1), {"R": 0, "L": 0})
    hip = patient.hips["L"]
    assert 80 < hip.centre[0] < 100 and -100 < patient.hips["R"].centre[0] < -80
    grid = _iso_grid(hip.centre, 40.0, 1.0)
    tissue_map = TissueMap(patient_layers(patient), grid)
    t1 = tissue_map.render(spin_echo_signal(MR_PROTOCOLS["T1_COR"]))
    x, y, z = tissue_map.coordinates()
    distance = np.sqrt((x - hip.centre[0]) ** 2 + (y - hip.centre[1]) ** 2 + (z - hip.centre[2]) ** 2)
    marrow = t1[distance < hip.radius - 4].mean()
    joint = t1[np.abs(distance - (hip.radius + hip.joint_gap_mm / 2)) < 0.7].mean()
    assert marrow > 1.8 * joint


def test_stage_two_has_dense_ct_rim_that_stage_zero_lacks():
    patient = make_patient(np.random.default_rng(3), {"R": 2, "L": 0})
    radius = {s: patient.hips[s].radius for s in "RL"}
    dense = {}
    for side in "RL":
        hu, distance = _hip_ct(patient, side)
        interior = distance < radius[side] - 3.0  # inside the head, clear of the cortex
        dense[side] = int((hu[interior] > 700).sum())
    assert dense["R"] > 50
    assert dense["L"] == 0


def test_stage_one_ct_is_normal_but_mr_shows_the_band():
    patient = make_patient(np.random.default_rng(4), {"R": 1, "L": 0})
    hu, distance = _hip_ct(patient, "R")
    interior = distance < patient.hips["R"].radius - 3.0
    assert hu[interior].max() < 450
    t1 = spin_echo_signal(MR_PROTOCOLS["T1_COR"])
    band = t1[TISSUE_INDEX["reactive_band"]]
    assert band < 0.5 * t1[TISSUE_INDEX["fatty_marrow"]]


def test_stage_three_collapse_and_substages():
    rng = np.random.default_rng(5)
    substages = set()
    for _ in range(12):
        patient = make_patient(rng, {"R": 3, "L": 4})
        for side in "RL":
            hip = patient.hips[side]
            assert hip.lesion.depression_mm > 0 and hip.lesion.crescent_mm > 0
            # The head surface is lowered along the lesion direction.
            top = hip.centre + hip.radius * hip.lesion.direction
            sdf = head_sdf(hip, *(np.array([v], dtype=np.float32) for v in top))
            assert sdf[0] == pytest.approx(hip.lesion.depression_mm, abs=0.05)
        substages.add(patient.hips["R"].substage)
        assert patient.hips["L"].joint_gap_mm < 2.5  # stage IV narrows the joint space
    assert substages == {"3A", "3B"}
    assert all(h == "3A" or h == "3B" for h in substages)


def test_lesion_extent_varies_independently_of_stage():
    rng = np.random.default_rng(6)
    fractions = {1: [], 4: []}
    for _ in range(15):
        patient = make_patient(rng, {"R": 1, "L": 4})
        fractions[1].append(patient.hips["R"].lesion.necrotic_fraction)
        fractions[4].append(patient.hips["L"].lesion.necrotic_fraction)
    for values in fractions.values():
        assert min(values) < 0.15 and max(values) > 0.25


def test_mr_image_is_noisy_non_negative_and_seeded():
    patient = make_patient(np.random.default_rng(7), {"R": 2, "L": 2})
    grid = _iso_grid(patient.hips["R"].centre, 20.0, 2.0)
    tissue_map = TissueMap(patient_layers(patient), grid)
    scanner = Scanner(gain=1000.0, noise=0.02)
    a = mr_image(tissue_map, MR_PROTOCOLS["T2W_COR"], scanner, np.random.default_rng(0))
    b = mr_image(tissue_map, MR_PROTOCOLS["T2W_COR"], scanner, np.random.default_rng(0))
    clean = tissue_map.render(spin_echo_signal(MR_PROTOCOLS["T2W_COR"])) * 1000.0
    assert a.shape == grid.shape and (a >= 0).all()
    np.testing.assert_array_equal(a, b)
    assert 0 < np.std(a - clean) < 100
