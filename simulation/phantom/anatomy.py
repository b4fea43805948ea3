"""The phantom's anatomy: a pelvis with two hips and ARCO-staged femoral-head lesions, drawn from an RNG.

Everything lives in patient coordinates (DICOM LPS mm: +x patient's left, +y posterior, +z head).
docs/phantom.md describes the model and the reasons behind each number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from simulation.phantom.difficulty import EASY, Difficulty
from simulation.phantom.shapes import dist, dot, floats, random_unit, unit

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
    rim: str = "band"  # "band" (stage I's reactive interface) or "double" (double line, stage >= II)

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
            "rim": self.rim,
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
    acetabular_sclerosis: bool = False
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
            "acetabular_sclerosis": self.acetabular_sclerosis,
            "osteophyte_mm": round(self.osteophyte_mm, 2),
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


def make_lesion(
    rng: np.random.Generator,
    stage: int,
    centre: np.ndarray,
    radius: float,
    side: str,
    difficulty: Difficulty = EASY,
    cue_rng: np.random.Generator | None = None,
) -> Lesion:
    """Draw a lesion of ARCO ``stage`` (1-4) for a head at ``centre`` with ``radius``.

    The extent is drawn independently of the stage; stage decides which features exist, and
    ``difficulty`` how reliably (its draws come from ``cue_rng``, so the ``easy`` phantom's
    draws from ``rng`` are those it always made).
    """
    cue_rng = cue_rng if cue_rng is not None else np.random.default_rng(0)
    lateral = SIDE_SIGN[side]
    spread = difficulty.lesion_spread
    elevation = math.radians(rng.uniform(15.0 * (1.0 - spread), 45.0 + 25.0 * spread))
    side_shift = rng.uniform(-0.5 * spread, 0.25 + 0.25 * spread)
    direction = unit([lateral * side_shift, -math.sin(elevation), math.cos(elevation)])
    axes = np.stack([random_unit(rng), random_unit(rng)])
    by_stage = difficulty.marrow_by_stage
    lesion = Lesion(
        direction=direction,
        extent_mm=float(rng.uniform(0.4 - 0.1 * spread, 1.15) * radius),
        wave_amplitude=float(rng.uniform(0.03, 0.10)),
        wave_axes=axes,
        wave_phase=rng.uniform(0.0, 2 * math.pi, size=2),
        band_mm=float(rng.uniform(1.0, 2.2)),
        granulation_mm=float(rng.uniform(0.7, 1.4)),
        sclerosis_mm=float(rng.uniform(1.0, 2.2)),
        halo_mm=float(rng.uniform(1.5, 3.5)),
        fibrosis=float(
            rng.uniform(0.0, 0.8)
            if not by_stage
            else rng.uniform(0.0, 0.3)
            if stage <= 2
            else rng.uniform(0.2, 0.8)
        ),
        oedema=0.0,
        oedema_decay_mm=float(rng.uniform(4.0, 10.0)),
        rim="band" if stage == 1 else "double",
    )
    # Oedema: common early and with collapse, less so in stable stage II; overlapping on purpose.
    oedema_chance = {1: 0.7, 2: 0.35, 3: 0.8, 4: 0.6}[stage] if by_stage else 0.6
    if rng.random() < oedema_chance:
        lesion.oedema = float(rng.uniform(0.25, 0.9))
    overlap = difficulty.cue_overlap
    if overlap > 0:  # an ill-defined double line reads as a band, and (rarer) the reverse
        if stage >= 2 and cue_rng.random() < overlap:
            lesion.rim = "band"
        elif stage == 1 and cue_rng.random() < overlap / 2:
            lesion.rim = "double"
    _add_cysts(lesion, rng, cue_rng, stage, centre, radius, overlap)
    if stage >= 3:
        lesion.crescent_mm = float(rng.uniform(0.6, 1.5))
        if overlap > 0 and cue_rng.random() < overlap:  # a hairline cleft, easy to miss
            lesion.crescent_mm = float(cue_rng.uniform(0.2, 0.5))
        if stage == 3:
            lesion.depression_mm = float(
                rng.uniform(0.4, 2.0) if rng.random() < 0.5 else rng.uniform(2.3, 5.0)
            )
        else:
            lesion.depression_mm = float(rng.uniform(2.5, 7.0))
    lesion.necrotic_fraction = _necrotic_fraction(lesion, centre, radius, rng)
    return lesion


def _add_cysts(
    lesion: Lesion,
    rng: np.random.Generator,
    cue_rng: np.random.Generator,
    stage: int,
    centre: np.ndarray,
    radius: float,
    overlap: float,
) -> None:
    """Cysts inside the segment: 1-4 from stage II (missing with chance ``overlap``), and with
    half that chance one small cyst at stage I."""
    count = int(rng.integers(1, 5)) if stage >= 2 else 0
    if overlap > 0:
        if stage >= 2 and cue_rng.random() < overlap:
            count = 0
        elif stage == 1 and cue_rng.random() < overlap / 2:
            count = 1
    surface = centre + radius * lesion.direction
    for _ in range(count):
        cyst_radius = float(rng.uniform(1.2, 3.2))
        depth = lesion.extent_mm - rng.uniform(1.5, 4.0)
        position = surface + max(depth, 2.0) * unit(-lesion.direction + 0.6 * random_unit(rng))
        # Keep the cyst inside the head with some bone around it.
        offset = position - centre
        limit = radius - 2.5 - cyst_radius
        if np.linalg.norm(offset) > limit:
            position = centre + offset * (limit / np.linalg.norm(offset))
        lesion.cysts.append((position, cyst_radius))


def _necrotic_fraction(lesion: Lesion, centre: np.ndarray, radius: float, rng: np.random.Generator) -> float:
    """Monte-Carlo share of the head volume inside the necrotic segment."""
    points = rng.uniform(-radius, radius, size=(20000, 3))
    points = points[np.linalg.norm(points, axis=1) < radius] + centre
    x, y, z = (points[:, i] for i in range(3))
    inside = necrotic_sdf(lesion, centre, radius, x, y, z) < 0
    return float(inside.mean())


def make_hip(
    rng: np.random.Generator,
    side: str,
    centre: np.ndarray,
    radius: float,
    stage: int,
    difficulty: Difficulty = EASY,
    cue_rng: np.random.Generator | None = None,
) -> Hip:
    """Draw one hip joint of a given ARCO ``stage`` (0 = healthy) around a head ``centre``."""
    lateral = SIDE_SIGN[side]
    # Neck-shaft angle about 130 deg, anteversion about 15 deg: from the head the neck runs
    # laterally, down and back.
    neck_shaft = math.radians(rng.uniform(125.0, 135.0))
    down = math.cos(math.pi - neck_shaft)
    neck = unit([lateral * math.sin(math.pi - neck_shaft), rng.uniform(0.15, 0.3), -down])
    cup = unit([-lateral * rng.uniform(0.45, 0.65), rng.uniform(-0.1, 0.1), 1.0])
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
    cue_rng = cue_rng if cue_rng is not None else np.random.default_rng(0)
    if stage >= 1:
        hip.lesion = make_lesion(rng, stage, hip.centre, hip.radius, side, difficulty, cue_rng)
    if stage == 4:
        _add_joint_disease(hip, rng, cue_rng, difficulty.cue_overlap)
    elif stage == 3 and difficulty.cue_overlap > 0 and cue_rng.random() < difficulty.cue_overlap / 2:
        hip.joint_gap_mm = float(cue_rng.uniform(2.2, 3.5))  # mild narrowing before stage IV
    # Effusion accompanies collapse, not always: present in some stage III and IV hips.
    if rng.random() < {3: 0.25, 4: 0.6}.get(stage, 0.0):
        hip.effusion_mm = float(rng.uniform(0.8, 2.5))
    return hip


def _add_joint_disease(
    hip: Hip, rng: np.random.Generator, cue_rng: np.random.Generator, overlap: float
) -> None:
    """Stage IV's joint: narrowing, acetabular sclerosis and cysts, osteophytes; each missing or
    mild with chance ``overlap`` (drawn from ``cue_rng``)."""
    hip.joint_gap_mm = float(rng.uniform(0.8, 2.0))  # joint-space narrowing
    if overlap > 0 and cue_rng.random() < overlap:
        hip.joint_gap_mm = float(cue_rng.uniform(2.2, 3.5))
    roof = hip.centre + hip.cup_direction * (hip.radius + hip.joint_gap_mm + 5.0)
    for _ in range(int(rng.integers(1, 3))):
        hip.acetabular_cysts.append((roof + 4.0 * random_unit(rng), float(rng.uniform(1.5, 3.0))))
    hip.osteophyte_mm = float(rng.uniform(2.0, 4.0))
    hip.acetabular_sclerosis = True
    if overlap > 0 and cue_rng.random() < overlap:
        hip.acetabular_cysts, hip.acetabular_sclerosis = [], False
    if overlap > 0 and cue_rng.random() < overlap:
        hip.osteophyte_mm = 0.0


def make_patient(
    rng: np.random.Generator,
    stages: dict[str, int],
    mean_radius_mm: float = 24.0,
    difficulty: Difficulty = EASY,
    cue_rng: np.random.Generator | None = None,
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
        hips[side] = make_hip(rng, side, centre, side_radius, stages[side], difficulty, cue_rng)
    n_waves = 4
    return Patient(
        body_centre=np.array([rng.uniform(-4.0, 4.0), body_y]),
        body_semi_axes=np.array([rng.uniform(160.0, 185.0), rng.uniform(105.0, 130.0)]),
        fat_mm=float(rng.uniform(12.0, 35.0)),
        hips=hips,
        texture_waves=np.stack([random_unit(rng) * rng.uniform(0.15, 0.45) for _ in range(n_waves)]),
        texture_phase=rng.uniform(0.0, 2 * math.pi, size=n_waves),
        red_marrow=float(rng.uniform(0.05, 0.25)),
    )


def head_radius(hip: Hip, x, y, z) -> np.ndarray | float:
    """Femoral-head radius along each point's direction, lowered where the head collapsed."""
    lesion = hip.lesion
    if lesion is None or lesion.depression_mm <= 0:
        return hip.radius
    cap = 2.0 * math.asin(min(lesion.extent_mm / (2.0 * hip.radius), 1.0))
    cos_cap = math.cos(cap)
    d = lesion.direction
    distance = np.maximum(dist(x, y, z, hip.centre), 1e-3)
    cos_angle = dot(x, y, z, hip.centre, d) / distance
    bump = np.clip((cos_angle - cos_cap) / (1.0 - cos_cap), 0.0, 1.0)
    bump = np.sqrt(bump)  # flat-topped depression with sloping edges
    return hip.radius - lesion.depression_mm * bump


def head_sdf(hip: Hip, x, y, z) -> np.ndarray:
    """Signed distance to the femoral-head surface (collapsed where the lesion depressed it)."""
    return dist(x, y, z, hip.centre) - head_radius(hip, x, y, z)


def necrotic_sdf(lesion: Lesion, centre: np.ndarray, radius: float, x, y, z) -> np.ndarray:
    """Negative inside the necrotic segment (before intersecting with the head)."""
    s = floats(centre + radius * lesion.direction)
    dx, dy, dz = x - s[0], y - s[1], z - s[2]
    wave = 1.0
    for axis, phase in zip(lesion.wave_axes, lesion.wave_phase, strict=True):
        axis = floats(axis / lesion.extent_mm)
        proj = dx * axis[0] + dy * axis[1] + dz * axis[2]
        wave = wave + lesion.wave_amplitude * np.sin(3.0 * proj + float(phase))
    return np.sqrt(dx * dx + dy * dy + dz * dz) - lesion.extent_mm * wave
