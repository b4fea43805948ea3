"""Synthetic hip anatomy with ARCO stage features, rendered to MR (spin echo) and CT (HU) images.

Everything lives in patient coordinates (DICOM LPS mm: +x patient's left, +y posterior, +z head).
Structures are signed distance functions painted in order with anti-aliased coverage, so any
voxel grid (any orientation, any spacing) is rendered at its voxel centres; thick slices are
averaged over a few through-plane sub-samples (partial volume). A voxel's value is linear in its
tissue fractions, so one set of coverage maps serves every MR protocol and CT. docs/phantom.md
describes the model and the reasons behind each number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# --------------------------------------------------------------------------------------------
# Tissues
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tissue:
    """MR and CT properties of one tissue.

    Attributes:
        name: tissue name.
        pd: proton density relative to pure water (0-1).
        t1_ms, t2_ms: relaxation times of the tissue's water component (about 1.5 T).
        fat_fraction: share of the MR signal's protons in fat (0-1); fat relaxes with
            ``FAT_T1_MS`` / ``FAT_T2_MS`` and is removed by fat suppression.
        hu: CT attenuation in Hounsfield units.
    """

    name: str
    pd: float
    t1_ms: float
    t2_ms: float
    fat_fraction: float
    hu: float


FAT_T1_MS = 340.0
FAT_T2_MS = 70.0

# Order fixes the tissue index used by the renderer.
TISSUES: tuple[Tissue, ...] = (
    Tissue("air", 0.0, 1000.0, 1.0, 0.0, -1000.0),
    Tissue("subcutaneous_fat", 0.95, 1000.0, 50.0, 0.95, -100.0),
    Tissue("muscle", 0.80, 1000.0, 40.0, 0.03, 50.0),
    Tissue("cortical_bone", 0.05, 1000.0, 1.0, 0.0, 1400.0),
    Tissue("fatty_marrow", 0.90, 1000.0, 40.0, 0.85, 250.0),
    Tissue("red_marrow", 0.85, 900.0, 45.0, 0.45, 300.0),
    Tissue("cartilage", 0.75, 1000.0, 38.0, 0.0, 100.0),
    Tissue("joint_fluid", 1.00, 2800.0, 280.0, 0.0, 10.0),
    # Bone-marrow oedema: water replaces fat; CT barely changes (ARCO I: "CT normal").
    Tissue("marrow_oedema", 0.95, 1300.0, 90.0, 0.35, 270.0),
    # Necrotic segment: mummified fat early (near-normal T1), fibrosis later.
    Tissue("necrotic_fat", 0.85, 1100.0, 50.0, 0.75, 250.0),
    Tissue("necrotic_fibrosis", 0.60, 1200.0, 45.0, 0.30, 320.0),
    # Reactive interface of stage I: low T1, moderately bright fluid-sensitive, CT normal.
    Tissue("reactive_band", 0.70, 1300.0, 70.0, 0.10, 270.0),
    # Double-line sign (stage >= II): inner granulation (bright T2), outer sclerosis (dark).
    Tissue("granulation", 0.90, 1500.0, 120.0, 0.05, 230.0),
    Tissue("sclerosis", 0.25, 1000.0, 15.0, 0.05, 950.0),
    # Trabecular thickening around the rim: MR looks like marrow, CT is dense.
    Tissue("sclerotic_halo", 0.88, 1000.0, 40.0, 0.80, 550.0),
    Tissue("cyst", 1.00, 2500.0, 250.0, 0.0, 25.0),
    # Subchondral fracture cleft (crescent sign): fluid on MR, gas/fluid lucency on CT.
    Tissue("fracture_cleft", 0.95, 2500.0, 200.0, 0.0, -350.0),
    # Compacted trabeculae of the collapsed fragment.
    Tissue("compacted_bone", 0.20, 1000.0, 12.0, 0.05, 1100.0),
    Tissue("acetabular_sclerosis", 0.20, 1000.0, 12.0, 0.05, 1050.0),
)
TISSUE_INDEX: dict[str, int] = {t.name: i for i, t in enumerate(TISSUES)}


# --------------------------------------------------------------------------------------------
# MR protocols and the spin-echo signal equation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MRProtocol:
    """Acquisition parameters of one MR protocol.

    Attributes:
        key: protocol key (``T1_COR`` ...).
        tr_ms, te_ms: repetition and echo time of the spin-echo signal equation.
        fat_residual: share of fat signal left after fat suppression (1.0 = none;
            Dixon water images leave least).
        noise_scale: noise relative to the site's T1 noise (fluid-sensitive images have lower
            signal and relatively more noise).
    """

    key: str
    tr_ms: float
    te_ms: float
    fat_residual: float
    noise_scale: float = 1.0


MR_PROTOCOLS: dict[str, MRProtocol] = {
    "T1_COR": MRProtocol("T1_COR", 550.0, 12.0, 1.0),
    "T1_AX": MRProtocol("T1_AX", 550.0, 12.0, 1.0),
    "T2W_COR": MRProtocol("T2W_COR", 4000.0, 80.0, 0.04, 0.7),
    "T2W_AX": MRProtocol("T2W_AX", 4000.0, 80.0, 0.04, 0.7),
    "PDFS_SAG": MRProtocol("PDFS_SAG", 3000.0, 30.0, 0.08, 0.8),
    # Extra series a PACS holds; ingestion must ignore them.
    "LOCALIZER": MRProtocol("LOCALIZER", 8.0, 4.0, 1.0, 1.5),
    "DWI": MRProtocol("DWI", 5000.0, 90.0, 0.03, 2.0),
}


def spin_echo_signal(protocol: MRProtocol, tissues: tuple[Tissue, ...] = TISSUES) -> np.ndarray:
    """Noise-free signal of each tissue for one protocol: float32 ``(n_tissues,)``.

    ``S = PD * [(1-ff) (1-exp(-TR/T1w)) exp(-TE/T2w) + ff * r_fat (1-exp(-TR/T1f)) exp(-TE/T2f)]``
    with ``r_fat`` the protocol's fat residual (fat suppression / Dixon water).
    """
    tr, te = protocol.tr_ms, protocol.te_ms
    fat = (1.0 - math.exp(-tr / FAT_T1_MS)) * math.exp(-te / FAT_T2_MS)
    values = []
    for t in tissues:
        water = (1.0 - math.exp(-tr / t.t1_ms)) * math.exp(-te / t.t2_ms)
        values.append(t.pd * ((1.0 - t.fat_fraction) * water + t.fat_fraction * protocol.fat_residual * fat))
    return np.asarray(values, dtype=np.float32)


def ct_values(tissues: tuple[Tissue, ...] = TISSUES) -> np.ndarray:
    """Hounsfield units of each tissue: float32 ``(n_tissues,)``."""
    return np.asarray([t.hu for t in tissues], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------

SIDE_SIGN = {"R": -1.0, "L": 1.0}  # the patient's right hip has x < 0 in LPS
STAGE3_SUBSTAGE_LIMIT_MM = 2.0  # ARCO 3A: depression <= 2 mm, 3B: more


@dataclass
class Lesion:
    """Osteonecrosis of one femoral head (all lengths in mm).

    The necrotic segment is the part of the head within ``extent_mm`` of the surface point
    ``centre + radius * direction`` (anterosuperior), its boundary made wavy; the reactive
    interface, double line and sclerosis are shells just outside that boundary.
    """

    direction: np.ndarray
    extent_mm: float
    wave_amplitude: float
    wave_axes: np.ndarray  # (2, 3) unit vectors of the boundary's waviness
    wave_phase: np.ndarray  # (2,)
    band_mm: float  # stage I reactive band width
    granulation_mm: float  # inner bright line (stage >= II)
    sclerosis_mm: float  # outer dark / CT-dense line (stage >= II)
    halo_mm: float  # CT-only trabecular thickening beyond the rim
    fibrosis: float  # 0-1 share of the necrotic segment that is fibrotic (low T1)
    oedema: float  # 0-1 peak marrow oedema weight
    oedema_decay_mm: float
    cysts: list[tuple[np.ndarray, float]] = field(default_factory=list)
    crescent_mm: float = 0.0  # subchondral fracture cleft width (stage >= III)
    depression_mm: float = 0.0  # head flattening (stage >= III)
    necrotic_fraction: float = 0.0  # share of the head volume that is necrotic

    def truth(self) -> dict:
        """JSON-ready description of the lesion's geometry."""
        fraction = self.necrotic_fraction
        return {
            "direction": [round(float(v), 4) for v in self.direction],
            "extent_mm": round(self.extent_mm, 2),
            "necrotic_volume_fraction": round(fraction, 4),
            "extent_class": "A" if fraction < 0.15 else ("B" if fraction <= 0.30 else "C"),
            "band_mm": round(self.band_mm, 2),
            "granulation_mm": round(self.granulation_mm, 2),
            "sclerosis_mm": round(self.sclerosis_mm, 2),
            "fibrosis": round(self.fibrosis, 3),
            "oedema": round(self.oedema, 3),
            "oedema_decay_mm": round(self.oedema_decay_mm, 2),
            "cysts": [
                {"centre_mm": [round(float(v), 2) for v in c], "radius_mm": round(r, 2)}
                for c, r in self.cysts
            ],
            "crescent_mm": round(self.crescent_mm, 2),
            "depression_mm": round(self.depression_mm, 2),
        }


@dataclass
class Hip:
    """One hip joint: femoral head, neck, shaft, trochanter, acetabulum, and its disease."""

    side: str
    centre: np.ndarray  # femoral-head centre, LPS mm
    radius: float
    joint_gap_mm: float  # cartilage + joint space between head and acetabular bone
    neck_direction: np.ndarray  # unit, from head centre towards the trochanter
    neck_length_mm: float
    cup_direction: np.ndarray  # unit, from head centre into the acetabular roof
    stage: int = 0
    lesion: Lesion | None = None
    acetabular_cysts: list[tuple[np.ndarray, float]] = field(default_factory=list)
    osteophyte_mm: float = 0.0
    effusion_mm: float = 0.0  # joint effusion distending the capsule (0 = none)

    @property
    def substage(self) -> str:
        """ARCO label with the 3A/3B split, e.g. ``"3B"``; ``"0"`` for a healthy hip."""
        if self.stage == 3 and self.lesion is not None:
            return "3A" if self.lesion.depression_mm <= STAGE3_SUBSTAGE_LIMIT_MM else "3B"
        return str(self.stage)

    def truth(self) -> dict:
        """JSON-ready ground truth for this hip."""
        return {
            "stage": self.stage,
            "substage": self.substage,
            "centre_mm": [round(float(v), 3) for v in self.centre],
            "radius_mm": round(self.radius, 3),
            "joint_gap_mm": round(self.joint_gap_mm, 2),
            "effusion_mm": round(self.effusion_mm, 2),
            "lesion": self.lesion.truth() if self.lesion is not None else None,
            "acetabular_cysts": [
                {"centre_mm": [round(float(v), 2) for v in c], "radius_mm": round(r, 2)}
                for c, r in self.acetabular_cysts
            ],
        }


@dataclass
class Patient:
    """A pelvis at hip level: body outline, fat layer, both hips, marrow texture."""

    body_centre: np.ndarray  # (x, y) of the elliptic body cylinder
    body_semi_axes: np.ndarray  # (a_x, a_y)
    fat_mm: float
    hips: dict[str, Hip]
    texture_waves: np.ndarray  # (n, 3) wave vectors (rad/mm) of the marrow texture
    texture_phase: np.ndarray  # (n,)
    red_marrow: float  # mean red-marrow share of femoral marrow


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    return _unit(rng.normal(size=3))


def make_lesion(rng: np.random.Generator, stage: int, centre: np.ndarray, radius: float, side: str) -> Lesion:
    """Draw a lesion of ARCO ``stage`` (1-4) for a head at ``centre`` with ``radius``.

    The extent is drawn independently of the stage; stage decides which features exist.
    """
    lateral = SIDE_SIGN[side]
    elevation = math.radians(rng.uniform(15.0, 45.0))  # tilt from superior towards anterior
    direction = _unit([lateral * rng.uniform(0.0, 0.25), -math.sin(elevation), math.cos(elevation)])
    axes = np.stack([_random_unit(rng), _random_unit(rng)])
    lesion = Lesion(
        direction=direction,
        extent_mm=float(rng.uniform(0.4, 1.15) * radius),
        wave_amplitude=float(rng.uniform(0.03, 0.10)),
        wave_axes=axes,
        wave_phase=rng.uniform(0.0, 2 * math.pi, size=2),
        band_mm=float(rng.uniform(1.0, 2.2)),
        granulation_mm=float(rng.uniform(0.7, 1.4)),
        sclerosis_mm=float(rng.uniform(1.0, 2.2)),
        halo_mm=float(rng.uniform(1.5, 3.5)),
        fibrosis=float(rng.uniform(0.0, 0.3) if stage <= 2 else rng.uniform(0.2, 0.8)),
        oedema=0.0,
        oedema_decay_mm=float(rng.uniform(4.0, 10.0)),
    )
    # Oedema: common early and with collapse, less so in stable stage II; overlapping on purpose.
    oedema_chance = {1: 0.7, 2: 0.35, 3: 0.8, 4: 0.6}[stage]
    if rng.random() < oedema_chance:
        lesion.oedema = float(rng.uniform(0.25, 0.9))
    surface = centre + radius * direction
    if stage >= 2:
        for _ in range(int(rng.integers(1, 5))):
            cyst_radius = float(rng.uniform(1.2, 3.2))
            depth = lesion.extent_mm - rng.uniform(1.5, 4.0)
            position = surface + max(depth, 2.0) * _unit(-direction + 0.6 * _random_unit(rng))
            # Keep the cyst inside the head with some bone around it.
            offset = position - centre
            limit = radius - 2.5 - cyst_radius
            if np.linalg.norm(offset) > limit:
                position = centre + offset * (limit / np.linalg.norm(offset))
            lesion.cysts.append((position, cyst_radius))
    if stage >= 3:
        lesion.crescent_mm = float(rng.uniform(0.6, 1.5))
        if stage == 3:
            lesion.depression_mm = float(
                rng.uniform(0.4, 2.0) if rng.random() < 0.5 else rng.uniform(2.3, 5.0)
            )
        else:
            lesion.depression_mm = float(rng.uniform(2.5, 7.0))
    lesion.necrotic_fraction = _necrotic_fraction(lesion, centre, radius, rng)
    return lesion


def _necrotic_fraction(lesion: Lesion, centre: np.ndarray, radius: float, rng: np.random.Generator) -> float:
    """Monte-Carlo share of the head volume inside the necrotic segment."""
    points = rng.uniform(-radius, radius, size=(20000, 3))
    points = points[np.linalg.norm(points, axis=1) < radius] + centre
    x, y, z = (points[:, i] for i in range(3))
    inside = _necrotic_sdf(lesion, centre, radius, x, y, z) < 0
    return float(inside.mean())


def make_hip(
    rng: np.random.Generator,
    side: str,
    centre: np.ndarray,
    radius: float,
    stage: int,
) -> Hip:
    """Draw one hip joint of a given ARCO ``stage`` (0 = healthy) around a head ``centre``."""
    lateral = SIDE_SIGN[side]
    # Neck-shaft angle about 130 deg, anteversion about 15 deg: from the head the neck runs
    # laterally, down and back.
    neck_shaft = math.radians(rng.uniform(125.0, 135.0))
    down = math.cos(math.pi - neck_shaft)
    neck = _unit([lateral * math.sin(math.pi - neck_shaft), rng.uniform(0.15, 0.3), -down])
    cup = _unit([-lateral * rng.uniform(0.45, 0.65), rng.uniform(-0.1, 0.1), 1.0])
    hip = Hip(
        side=side,
        centre=np.asarray(centre, dtype=np.float64),
        radius=float(radius),
        joint_gap_mm=float(rng.uniform(3.5, 5.0)),
        neck_direction=neck,
        neck_length_mm=float(rng.uniform(40.0, 50.0)),
        cup_direction=cup,
        stage=stage,
    )
    if stage >= 1:
        hip.lesion = make_lesion(rng, stage, hip.centre, hip.radius, side)
    if stage == 4:
        hip.joint_gap_mm = float(rng.uniform(0.8, 2.0))  # joint-space narrowing
        roof = hip.centre + hip.cup_direction * (hip.radius + hip.joint_gap_mm + 5.0)
        for _ in range(int(rng.integers(1, 3))):
            hip.acetabular_cysts.append((roof + 4.0 * _random_unit(rng), float(rng.uniform(1.5, 3.0))))
        hip.osteophyte_mm = float(rng.uniform(2.0, 4.0))
    # Effusion accompanies collapse, not always: present in some stage III and IV hips.
    if rng.random() < {3: 0.25, 4: 0.6}.get(stage, 0.0):
        hip.effusion_mm = float(rng.uniform(0.8, 2.5))
    return hip


def make_patient(
    rng: np.random.Generator,
    stages: dict[str, int],
    mean_radius_mm: float = 24.0,
) -> Patient:
    """Draw a patient: body habitus, both hips with the given stages ``{"L": s, "R": s}``.

    Femoral heads sit near x = -/+ 85..95 mm (right/left), radius about ``mean_radius_mm``.
    """
    body_y = rng.uniform(5.0, 15.0)
    head_y = rng.uniform(-6.0, 6.0)
    head_z = rng.uniform(-8.0, 8.0)
    radius = float(np.clip(rng.normal(mean_radius_mm, 1.0), 21.5, 26.5))
    hips = {}
    for side in ("R", "L"):
        centre = np.array(
            [
                SIDE_SIGN[side] * rng.uniform(85.0, 95.0),
                head_y + rng.uniform(-2.0, 2.0),
                head_z + rng.uniform(-2.0, 2.0),
            ]
        )
        side_radius = float(np.clip(radius + rng.normal(0.0, 0.3), 21.0, 27.0))
        hips[side] = make_hip(rng, side, centre, side_radius, stages[side])
    n_waves = 4
    return Patient(
        body_centre=np.array([rng.uniform(-4.0, 4.0), body_y]),
        body_semi_axes=np.array([rng.uniform(160.0, 185.0), rng.uniform(105.0, 130.0)]),
        fat_mm=float(rng.uniform(12.0, 35.0)),
        hips=hips,
        texture_waves=np.stack([_random_unit(rng) * rng.uniform(0.15, 0.45) for _ in range(n_waves)]),
        texture_phase=rng.uniform(0.0, 2 * math.pi, size=n_waves),
        red_marrow=float(rng.uniform(0.05, 0.25)),
    )


# --------------------------------------------------------------------------------------------
# Signed distance functions (negative inside), evaluated on broadcast coordinate arrays
# --------------------------------------------------------------------------------------------

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


def _floats(v) -> tuple[float, ...]:
    """Python floats, so float32 coordinate arrays stay float32 (NumPy 2 promotion rules)."""
    return tuple(float(e) for e in v)


def _dot(x, y, z, c, d) -> np.ndarray:
    """``(p - c) . d`` for coordinate arrays ``p = (x, y, z)``."""
    c, d = _floats(c), _floats(d)
    return (x - c[0]) * d[0] + (y - c[1]) * d[1] + (z - c[2]) * d[2]


def _dist(x, y, z, c) -> np.ndarray:
    c = _floats(c)
    return np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)


def _sphere(x, y, z, c, r) -> np.ndarray:
    return _dist(x, y, z, c) - r


def _capsule(x, y, z, a, b, r) -> np.ndarray:
    """Distance to the segment a-b minus r."""
    ab = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    length2 = float(ab @ ab)
    a, ab = _floats(a), _floats(ab)
    t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) * (1.0 / length2), 0.0, 1.0)
    return (
        np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2) - r
    )


def _ellipsoid(x, y, z, c, semi) -> np.ndarray:
    """Approximate SDF of an axis-aligned ellipsoid (exact on the surface, scaled inside)."""
    c, semi = _floats(c), _floats(semi)
    k = np.sqrt(((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2 + ((z - c[2]) / semi[2]) ** 2)
    return (k - 1.0) * float(min(semi))


def _head_radius(hip: Hip, x, y, z) -> np.ndarray | float:
    """Femoral-head radius along each point's direction, lowered where the head collapsed."""
    lesion = hip.lesion
    if lesion is None or lesion.depression_mm <= 0:
        return hip.radius
    cap = 2.0 * math.asin(min(lesion.extent_mm / (2.0 * hip.radius), 1.0))
    cos_cap = math.cos(cap)
    d = lesion.direction
    distance = np.maximum(_dist(x, y, z, hip.centre), 1e-3)
    cos_angle = _dot(x, y, z, hip.centre, d) / distance
    bump = np.clip((cos_angle - cos_cap) / (1.0 - cos_cap), 0.0, 1.0)
    bump = np.sqrt(bump)  # flat-topped depression with sloping edges
    return hip.radius - lesion.depression_mm * bump


def _head_sdf(hip: Hip, x, y, z) -> np.ndarray:
    return _dist(x, y, z, hip.centre) - _head_radius(hip, x, y, z)


def _necrotic_sdf(lesion: Lesion, centre: np.ndarray, radius: float, x, y, z) -> np.ndarray:
    """Negative inside the necrotic segment (before intersecting with the head)."""
    s = _floats(centre + radius * lesion.direction)
    dx, dy, dz = x - s[0], y - s[1], z - s[2]
    wave = 1.0
    for axis, phase in zip(lesion.wave_axes, lesion.wave_phase, strict=True):
        axis = _floats(axis / lesion.extent_mm)
        proj = dx * axis[0] + dy * axis[1] + dz * axis[2]
        wave = wave + lesion.wave_amplitude * np.sin(3.0 * proj + float(phase))
    return np.sqrt(dx * dx + dy * dy + dz * dz) - lesion.extent_mm * wave


def _shell(sdf: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """SDF of the layer ``inner < sdf < outer`` of another SDF."""
    mid, half = 0.5 * (inner + outer), 0.5 * (outer - inner)
    return np.abs(sdf - mid) - half


# --------------------------------------------------------------------------------------------
# Layers: what gets painted where
# --------------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One painted structure.

    Attributes:
        tissue: tissue name.
        sdf: signed distance (mm) on coordinate arrays; coverage is its anti-aliased inside.
        box: ``(lo, hi)`` LPS bounds outside which the layer is certainly empty; None = everywhere.
        weight: optional extra coverage factor in [0, 1] (mixtures such as oedema).
    """

    tissue: str
    sdf: Callable[..., np.ndarray]
    box: tuple[np.ndarray, np.ndarray] | None = None
    weight: Callable[..., np.ndarray] | None = None


def _box(centre, half) -> tuple[np.ndarray, np.ndarray]:
    centre = np.asarray(centre, dtype=np.float64)
    half = np.broadcast_to(np.asarray(half, dtype=np.float64), (3,))
    return centre - half, centre + half


def _hip_layers(patient: Patient, hip: Hip) -> list[Layer]:
    c, r = hip.centre, hip.radius
    lateral = SIDE_SIGN[hip.side]
    gap = hip.joint_gap_mm
    neck_end = c + hip.neck_direction * hip.neck_length_mm
    shaft_end = neck_end + np.array([0.0, 0.0, -120.0])
    trochanter = neck_end + np.array([lateral * 14.0, 4.0, 14.0])
    trochanter_semi = np.array([13.0, 16.0, 22.0])
    neck_radius = 0.62 * r
    shaft_radius = 16.0
    cup = hip.cup_direction
    block_centre = c + cup * (r + 10.0) + np.array([-lateral * 4.0, 0.0, 12.0])
    block_semi = np.array([15.0, 30.0, 42.0])  # ilium-like: thin medio-laterally, tall
    cup_outer = r + gap + 7.0

    femur_box = (
        np.minimum.reduce(
            [c - r - 3, neck_end - 30, shaft_end - shaft_radius - 2, trochanter - trochanter_semi - 2]
        ),
        np.maximum.reduce(
            [c + r + 3, neck_end + 30, shaft_end + shaft_radius + 2, trochanter + trochanter_semi + 2]
        ),
    )
    head_box = _box(c, r + 3.0)
    pelvis_box = (
        np.minimum(block_centre - block_semi - 2, c - cup_outer - 2),
        np.maximum(block_centre + block_semi + 2, c + cup_outer + 2),
    )

    def cup_side(x, y, z):
        """Negative on the acetabular side of the head (covering a bit more than a hemisphere)."""
        return -(_dot(x, y, z, c, cup) + 0.3 * _dist(x, y, z, c))

    def pelvis(x, y, z):
        cup_shell = np.maximum(_shell(_dist(x, y, z, c), r + gap, cup_outer), cup_side(x, y, z))
        return np.minimum(_ellipsoid(x, y, z, block_centre, block_semi), cup_shell)

    memo: dict[str, tuple] = {}

    def femur_parts(x, y, z):
        # Cortex, marrow and texture layers share one block: compute the parts once per block.
        if memo.get("key") is not x:
            memo["key"] = x
            memo["parts"] = (
                _head_sdf(hip, x, y, z),
                _capsule(x, y, z, c, neck_end, neck_radius),
                _capsule(x, y, z, neck_end + np.array([0, 0, 10.0]), shaft_end, shaft_radius),
                _ellipsoid(x, y, z, trochanter, trochanter_semi),
            )
        return memo["parts"]

    def femur(x, y, z, inset=0.0):
        head, neck, shaft, troch = femur_parts(x, y, z)
        head = head + inset * 0.5  # thin subchondral plate
        neck = neck + inset
        shaft = shaft + inset * 1.5
        troch = troch + inset * 0.6
        sdf = np.minimum(np.minimum(head, neck), np.minimum(shaft, troch))
        if hip.osteophyte_mm > 0 and inset == 0.0:
            ring = _shell(_dist(x, y, z, c), r - 2.0, r + hip.osteophyte_mm)
            band = np.abs(_dot(x, y, z, c, hip.neck_direction) - 0.55 * r) - 3.0
            sdf = np.minimum(sdf, np.maximum(ring, band))
        return sdf

    def head_marrow(x, y, z):
        return _head_sdf(hip, x, y, z) + 1.2

    layers = [
        Layer("cortical_bone", pelvis, pelvis_box),
        Layer("red_marrow", lambda x, y, z: pelvis(x, y, z) + 2.0, pelvis_box),
    ]
    if hip.stage == 4:
        lesion = hip.lesion

        def acetabular_sclerosis(x, y, z):
            shell = _shell(_dist(x, y, z, c), r + gap - 0.5, r + gap + 3.5)
            cone = 0.55 * _dist(x, y, z, c) - _dot(x, y, z, c, lesion.direction)
            return np.maximum(shell, np.maximum(cone, cup_side(x, y, z)))

        layers.append(Layer("acetabular_sclerosis", acetabular_sclerosis, _box(c, cup_outer + 2)))
        for centre, radius in hip.acetabular_cysts:
            layers.append(
                Layer(
                    "cyst",
                    lambda x, y, z, cc=centre, rr=radius: _sphere(x, y, z, cc, rr),
                    _box(centre, radius + 2),
                )
            )
    if hip.effusion_mm > 0:
        # Joint effusion distends the capsule around the head and neck.
        layers.append(
            Layer(
                "joint_fluid",
                lambda x, y, z: np.maximum(
                    _capsule(
                        x,
                        y,
                        z,
                        c,
                        c + hip.neck_direction * 0.6 * hip.neck_length_mm,
                        r + gap + hip.effusion_mm,
                    ),
                    -cup_side(x, y, z),
                ),
                _box(c + hip.neck_direction * 15, r + gap + 20),
            )
        )
    layers += [
        Layer("cartilage", lambda x, y, z: _sphere(x, y, z, c, r + gap), _box(c, r + gap + 2)),
        Layer(
            "joint_fluid",
            lambda x, y, z: _shell(_dist(x, y, z, c), r + 0.5 * gap - 0.3, r + 0.5 * gap + 0.3),
            _box(c, r + gap + 2),
        ),
        Layer("cortical_bone", femur, femur_box),
        Layer("fatty_marrow", lambda x, y, z: femur(x, y, z, inset=2.5), femur_box),
    ]

    waves, phase = patient.texture_waves, patient.texture_phase

    def red_share(x, y, z):
        # Smooth marrow texture; more red marrow towards the shaft.
        texture = 0.0
        for k, p in zip(waves, phase, strict=True):
            texture = texture + np.cos(_dot(x, y, z, (0.0, 0.0, 0.0), k) + float(p))
        below = np.clip((float(c[2]) - z) * (1.0 / 60.0), 0.0, 1.0)
        return np.clip(patient.red_marrow * (1.0 + 0.35 * texture) + 0.35 * below, 0.0, 1.0)

    layers.append(Layer("red_marrow", lambda x, y, z: femur(x, y, z, inset=2.5), femur_box, red_share))

    lesion = hip.lesion
    if lesion is None:
        return layers

    def necrotic(x, y, z):
        return _necrotic_sdf(lesion, c, r, x, y, z)

    def inside_head(sdf):
        return lambda x, y, z: np.maximum(sdf(x, y, z), head_marrow(x, y, z))

    if lesion.oedema > 0:

        def oedema_weight(x, y, z):
            outside = np.maximum(necrotic(x, y, z), 0.0)
            return lesion.oedema * np.exp(-outside / lesion.oedema_decay_mm)

        oedema_box = _box(c + hip.neck_direction * 12.0, r + 14.0)
        layers.append(
            Layer("marrow_oedema", lambda x, y, z: femur(x, y, z, inset=2.5), oedema_box, oedema_weight)
        )

    layers.append(Layer("necrotic_fat", inside_head(necrotic), head_box))
    if lesion.fibrosis > 0:
        layers.append(
            Layer(
                "necrotic_fibrosis",
                inside_head(necrotic),
                head_box,
                lambda x, y, z: np.full_like(x, lesion.fibrosis),
            )
        )
    if hip.stage == 1:
        layers.append(
            Layer(
                "reactive_band",
                inside_head(lambda x, y, z: _shell(necrotic(x, y, z), 0.0, lesion.band_mm)),
                head_box,
            )
        )
    else:
        g, s, h = lesion.granulation_mm, lesion.sclerosis_mm, lesion.halo_mm
        layers += [
            Layer(
                "sclerotic_halo", inside_head(lambda x, y, z: _shell(necrotic(x, y, z), s, s + h)), head_box
            ),
            Layer("sclerosis", inside_head(lambda x, y, z: _shell(necrotic(x, y, z), 0.0, s)), head_box),
            Layer("granulation", inside_head(lambda x, y, z: _shell(necrotic(x, y, z), -g, 0.0)), head_box),
        ]
        for centre, radius in lesion.cysts:
            box = _box(centre, radius + 3)
            layers.append(
                Layer("sclerosis", lambda x, y, z, cc=centre, rr=radius: _sphere(x, y, z, cc, rr + 0.8), box)
            )
            layers.append(Layer("cyst", lambda x, y, z, cc=centre, rr=radius: _sphere(x, y, z, cc, rr), box))
    if hip.stage >= 3:
        compaction = 0.8 + 0.4 * lesion.depression_mm

        def within_cap(sdf):
            return lambda x, y, z: np.maximum(sdf(x, y, z), necrotic(x, y, z) + 0.15 * lesion.extent_mm)

        def below_surface(depth_from, depth_to):
            return lambda x, y, z: _shell(_head_sdf(hip, x, y, z), -depth_to, -depth_from)

        cleft_top = 1.2
        cleft_bottom = cleft_top + lesion.crescent_mm
        layers += [
            Layer(
                "compacted_bone", within_cap(below_surface(cleft_bottom, cleft_bottom + compaction)), head_box
            ),
            Layer("fracture_cleft", within_cap(below_surface(cleft_top, cleft_bottom)), head_box),
        ]
    return layers


def patient_layers(patient: Patient) -> list[Layer]:
    """All layers of a patient in painting order (later layers paint over earlier ones)."""
    bx, by = _floats(patient.body_centre)
    ax, ay = _floats(patient.body_semi_axes)

    def body(x, y, z, shrink=0.0):
        k = np.sqrt(((x - bx) / (ax - shrink)) ** 2 + ((y - by) / (ay - shrink)) ** 2)
        return (k - 1.0) * (ay - shrink)

    layers = [
        Layer("subcutaneous_fat", body),
        Layer("muscle", lambda x, y, z: body(x, y, z, patient.fat_mm)),
    ]
    for side in ("R", "L"):
        layers += _hip_layers(patient, patient.hips[side])
    return layers


# --------------------------------------------------------------------------------------------
# Rendering on a voxel grid
# --------------------------------------------------------------------------------------------


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
        on them, see ``_hip_layers``)."""
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


# --------------------------------------------------------------------------------------------
# Acquisition: site gain, bias field, noise
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scanner:
    """A site's scanner behaviour.

    Attributes:
        gain: stored value per unit signal (vendor scaling).
        noise: Gaussian noise sigma per channel in signal units for T1 (fatty marrow T1
            signal is about 0.55), scaled by each protocol's ``noise_scale``.
        bias: strength of the smooth multiplicative receive-coil bias field (0 = flat).
        ct_noise_hu: CT noise sigma in HU.
    """

    gain: float = 2000.0
    noise: float = 0.015
    bias: float = 0.15
    ct_noise_hu: float = 12.0


def bias_field(coords: Coords, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field at coordinates ``(x, y, z)`` (LPS mm arrays): ``exp`` of a random
    low-order polynomial whose values stay within about +-``strength`` over a 200 mm radius."""
    linear = _random_unit(rng) * strength
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
    signal = tissue_map.render(spin_echo_signal(protocol))
    signal *= bias_field(tissue_map.coordinates(), scanner.bias, rng)
    sigma = scanner.noise * protocol.noise_scale
    real = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag)  # Rician magnitude
    return magnitude * np.float32(scanner.gain)


def ct_image(tissue_map: TissueMap, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """One CT acquisition in HU with Gaussian noise: float32 ``(S, R, C)``."""
    hu = tissue_map.render(ct_values())
    hu += np.float32(scanner.ct_noise_hu) * rng.standard_normal(hu.shape, dtype=np.float32)
    return hu
