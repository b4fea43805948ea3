"""Where series lie: slice geometries of MR and CT series, rigid MR-to-CT session offsets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.sitedata.volume import affine_from_dicom
from simulation.phantom.anatomy import Patient
from simulation.synth.plan import SIDES, SiteProfile, SizePreset

# Slice orientation -> ImageOrientationPatient (row direction, column direction).
ORIENTATION_COSINES = {
    "COR": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "AX": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "SAG": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
}
PROTOCOL_ORIENTATION = {"T1_COR": "COR", "T2W_COR": "COR", "T1_AX": "AX", "T2W_AX": "AX", "PDFS_SAG": "SAG"}


@dataclass(frozen=True)
class SeriesGeometry:
    """Where a series' voxels lie in its session's LPS frame."""

    orientation: tuple[float, ...]  # ImageOrientationPatient
    shape: tuple[int, int, int]
    pixel_mm: float
    step_mm: float  # SpacingBetweenSlices
    thickness_mm: float
    first_position: np.ndarray

    @property
    def affine(self) -> np.ndarray:
        """``(s, r, c, 1)`` -> LPS mm, as ``common.sitedata.volume.Volume.affine``."""
        return affine_from_dicom(
            self.first_position,
            np.asarray(self.orientation),
            (self.pixel_mm, self.pixel_mm),
            self.normal * self.step_mm,
        )

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation)
        return np.cross(o[:3], o[3:])


def box_geometry(
    orientation: str | tuple[float, ...],
    centre: np.ndarray,
    width_mm: float,
    height_mm: float,
    slab_mm: float,
    pixel_mm: float,
    thickness_mm: float,
    step_mm: float,
) -> SeriesGeometry:
    """A series covering ``width x height`` in-plane and ``slab`` through-plane around ``centre``."""
    cosines = ORIENTATION_COSINES[orientation] if isinstance(orientation, str) else tuple(orientation)
    o = np.asarray(cosines)
    row, col = o[:3], o[3:]
    normal = np.cross(row, col)
    columns = max(int(round(width_mm / pixel_mm)), 8)
    rows = max(int(round(height_mm / pixel_mm)), 8)
    slices = max(int(math.ceil(slab_mm / step_mm)) + 1, 1)
    first = (
        np.asarray(centre, dtype=np.float64)
        - row * pixel_mm * (columns - 1) / 2
        - col * pixel_mm * (rows - 1) / 2
        - normal * step_mm * (slices - 1) / 2
    )
    return SeriesGeometry(cosines, (slices, rows, columns), pixel_mm, step_mm, thickness_mm, first)


def rigid_matrix(rotation_deg: np.ndarray, translation_mm: np.ndarray) -> np.ndarray:
    """4x4 ``[R | t]`` with ``R = Rz @ Ry @ Rx`` (angles in degrees about the LPS axes)."""
    ax, ay, az = np.radians(rotation_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ ry @ rx
    matrix[:3, 3] = translation_mm
    return matrix


def mr_geometries(
    site: SiteProfile, anatomy: Patient, preset: SizePreset, rng: np.random.Generator
) -> dict[str, SeriesGeometry]:
    """One geometry per MR plane (T1 and T2 of one plane share it, as sites usually plan them)."""
    heads = np.stack([anatomy.hips[s].centre for s in SIDES])
    mid = heads.mean(axis=0)
    pixel, thickness = site.inplane_mm, site.thickness_mm
    step = thickness * (1.0 + site.gap_fraction)

    def jitter():
        return rng.uniform(-preset.fov_jitter_mm, preset.fov_jitter_mm, size=3)

    w, h, slab = preset.cor_fov
    cor = box_geometry(
        "COR", np.array([0.0, mid[1], mid[2] - 0.1 * h]) + jitter(), w, h, slab, pixel, thickness, step
    )
    w, h, slab = preset.ax_fov
    ax = box_geometry(
        "AX", np.array([0.0, mid[1] + 0.1 * h, mid[2]]) + jitter(), w, h, slab, pixel, thickness, step
    )
    w, h, margin = preset.sag_fov
    half_x = float(np.abs(heads[:, 0]).max()) + margin
    sag_step = max(step, 5.0)
    sag = box_geometry(
        "SAG",
        np.array([0.0, mid[1], mid[2]]) + jitter() * [0, 1, 1],
        w,
        h,
        2 * half_x,
        pixel,
        min(thickness, sag_step),
        sag_step,
    )
    return {"COR": cor, "AX": ax, "SAG": sag}


def head_midpoint(anatomy: Patient) -> np.ndarray:
    """Midpoint of the two femoral-head centres (LPS mm), around which series are planned."""
    return np.stack([anatomy.hips[s].centre for s in SIDES]).mean(axis=0)


def localizer_geometries(anatomy: Patient, preset: SizePreset) -> list[SeriesGeometry]:
    """The three single-image planes (SAG, COR, AX) of a 3-plane localiser through the heads."""
    mid = head_midpoint(anatomy)
    matrix, pixel = preset.localizer
    planes = []
    for plane in ("SAG", "COR", "AX"):
        centre = mid.copy()
        if plane == "SAG":
            centre[0] = 0.0
        planes.append(box_geometry(plane, centre, matrix * pixel, matrix * pixel, 0.0, pixel, 8.0, 8.0))
    return planes


def ct_session_offset(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random rigid MR-to-CT session offset: ``(matrix, translation_mm, rotation_deg)``.

    Translation up to 10 mm, rotations up to 4 deg per axis; rounded first, so the truth's numbers
    are exactly the offset the CT is rendered with.
    """
    translation = rng.normal(size=3)
    translation = translation / np.linalg.norm(translation) * rng.uniform(0.0, 10.0)
    rotation = rng.uniform(-4.0, 4.0, size=3)
    translation, rotation = np.round(translation, 4), np.round(rotation, 4)
    return rigid_matrix(rotation, translation), translation, rotation


def ct_geometry(
    anatomy: Patient, offset: np.ndarray, preset: SizePreset, rng: np.random.Generator
) -> SeriesGeometry:
    """The axial CT series around the heads, in the CT session's frame (``offset`` applied)."""
    mid = head_midpoint(anatomy)
    centre_ct = (
        offset[:3, :3] @ mid + offset[:3, 3] + rng.uniform(-preset.fov_jitter_mm, preset.fov_jitter_mm, 3)
    )
    centre_ct[0] = rng.uniform(-2.0, 2.0)
    centre_ct[1] += 0.1 * preset.ct_fov[1]
    pixel = float(np.round(rng.uniform(*preset.ct_pixel_mm), 3))
    thickness = float(rng.choice(np.unique(preset.ct_thickness_mm)))
    w, h, slab = preset.ct_fov
    return box_geometry("AX", centre_ct, w, h, slab, pixel, thickness, thickness)
