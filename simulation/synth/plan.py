"""What a synthetic federation holds: sizes, site profiles (vendor style, resolution, skew), patient plans."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
)

from simulation import identifiers as ids
from simulation.phantom.difficulty import EASY, Difficulty, reader_label

SIZES = ("default", "tiny")
PROTOCOL_KEYS = ("T1_COR", "T2W_COR", "T1_AX", "T2W_AX", "PDFS_SAG")
SIDES = ("R", "L")

# Per vendor style: series descriptions of the five protocols and of the extra series.
NAMING_SCHEMES: tuple[dict[str, str], ...] = (
    {
        "T1_COR": "t1_tse_cor", "T2W_COR": "t2_tse_dixon_cor_W", "T1_AX": "t1_tse_tra",
        "T2W_AX": "t2_tse_dixon_tra_W", "PDFS_SAG": "pd_tse_fs_sag", "LOCALIZER": "localizer",
        "DWI": "ep2d_diff_tra_b800",
    },
    {
        "T1_COR": "COR T1 FSE", "T2W_COR": "COR T2 FS", "T1_AX": "AX T1 FSE", "T2W_AX": "AX T2 FS",
        "PDFS_SAG": "SAG PD FS", "LOCALIZER": "3-PLANE LOC",
    },
    {
        "T1_COR": "T1 TSE COR", "T2W_COR": "T2 DIXON W COR", "T1_AX": "T1 TSE AX",
        "T2W_AX": "T2 DIXON W AX", "PDFS_SAG": "PD SPAIR SAG", "LOCALIZER": "Survey", "DWI": "DWI AX b800",
    },
    {
        "T1_COR": "t1_tse_cor", "T2W_COR": "t2_tse_fs_cor", "T1_AX": "t1_tse_tra", "T2W_AX": "t2_tse_fs_tra",
        "PDFS_SAG": "pd_tse_fs_sag", "LOCALIZER": "scout_3plane",
    },
)  # fmt: skip
VENDORS = (
    ("SIEMENS", "MAGNETOM Aera", 1.5, "SIEMENS", "SOMATOM Definition AS"),
    ("GE MEDICAL SYSTEMS", "SIGNA Architect", 3.0, "GE MEDICAL SYSTEMS", "Revolution CT"),
    ("Philips", "Ingenia", 3.0, "Philips", "iCT 256"),
    ("SIEMENS", "MAGNETOM Skyra", 3.0, "TOSHIBA", "Aquilion ONE"),
)
INSTITUTIONS = (
    "Hanbit University Hospital",
    "Seoul Riverside Medical Center",
    "Daegu Namsan Hospital",
    "Busan Coastal University Hospital",
    "Gwangju Mudeung Medical Center",
    "Incheon Harbor General Hospital",
)
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEGLSLossless)
PIXEL_BIN = (1, 3, 0, 2)  # per style: quarter of the pixel-spacing range
THICKNESS_BIN = (2, 0, 3, 1)  # per style: quarter of the slice-thickness range
FOLDER_STYLES = ("patient/study/series", "flat-numeric", "date-nested", "dicomdir-like")


@dataclass(frozen=True)
class SizePreset:
    """Fields of view (mm) and resolutions of one generator size."""

    inplane_mm: tuple[float, float]  # MR pixel spacing range
    thickness_mm: tuple[float, float]  # MR slice thickness range
    cor_fov: tuple[float, float, float]  # width (x), height (z), slab (y)
    ax_fov: tuple[float, float, float]  # width (x), height (y), slab (z)
    sag_fov: tuple[float, float, float]  # width (y), height (z), slab half-margin beyond heads (x)
    ct_pixel_mm: tuple[float, float]
    ct_thickness_mm: tuple[float, float]
    ct_fov: tuple[float, float, float]  # width (x), height (y), slab (z)
    localizer: tuple[int, float]  # matrix, pixel mm
    fov_jitter_mm: float


PRESETS = {
    "default": SizePreset(
        inplane_mm=(1.3, 1.9),
        thickness_mm=(3.0, 5.0),
        cor_fov=(340.0, 170.0, 96.0),
        ax_fov=(340.0, 230.0, 96.0),
        sag_fov=(170.0, 160.0, 36.0),
        ct_pixel_mm=(1.0, 1.25),
        ct_thickness_mm=(2.5, 3.0),
        ct_fov=(330.0, 250.0, 100.0),
        localizer=(128, 3.0),
        fov_jitter_mm=5.0,
    ),
    "tiny": SizePreset(
        inplane_mm=(2.6, 3.0),
        thickness_mm=(5.0, 5.0),
        cor_fov=(270.0, 100.0, 60.0),
        ax_fov=(270.0, 100.0, 60.0),
        sag_fov=(100.0, 100.0, 30.0),
        ct_pixel_mm=(2.5, 2.5),
        ct_thickness_mm=(4.0, 4.0),
        ct_fov=(290.0, 110.0, 80.0),
        localizer=(48, 6.0),
        fov_jitter_mm=2.0,
    ),
}


@dataclass(frozen=True)
class SiteProfile:
    """Everything that makes one synthetic hospital differ from another."""

    index: int
    name: str
    institution: str
    naming: int  # index into NAMING_SCHEMES
    folder_style: str
    transfer_syntax: str
    vendor: int  # index into VENDORS
    mrn_style: int
    gain: float
    noise: float
    bias: float
    ct_noise_hu: float
    mr_slope: float  # RescaleSlope of stored MR pixels
    inplane_mm: float
    thickness_mm: float
    gap_fraction: float  # SpacingBetweenSlices = thickness * (1 + gap_fraction)
    stage_probabilities: tuple[float, float, float, float]
    mean_head_radius_mm: float
    ct_fraction: float
    patients: int
    never_acquired: tuple[str, ...] = ()
    sometimes_missing: dict[str, float] = field(default_factory=dict)
    extra_dwi: bool = False
    difficulty: Difficulty = EASY


def make_site(index: int, seed: int, patients: int, size: str, difficulty: Difficulty = EASY) -> SiteProfile:
    """Draw site ``index``'s profile from the federation ``seed`` (MR noise scaled by ``difficulty``)."""
    rng = np.random.default_rng([seed, index, 7001])
    preset = PRESETS[size]
    style = index % 4
    never: tuple[str, ...] = ()
    sometimes: dict[str, float] = {}
    if style == 1:
        never = ("PDFS_SAG",)
    elif style == 2:
        sometimes = {"T2W_AX": 0.35}
    elif style == 3:
        sometimes = {"T1_AX": 0.10}
    # Resolution is stratified over the styles, so any four sites span the ranges.
    lo, hi = preset.inplane_mm
    inplane = lo + (hi - lo) * ((PIXEL_BIN[style] + rng.uniform()) / 4)
    lo, hi = preset.thickness_mm
    thickness = float(np.round((lo + (hi - lo) * ((THICKNESS_BIN[style] + rng.uniform()) / 4)) * 2) / 2)
    return SiteProfile(
        index=index,
        name=f"site-{index:02d}",
        institution=INSTITUTIONS[index % len(INSTITUTIONS)]
        + ("" if index < len(INSTITUTIONS) else f" {index}"),
        naming=style,
        folder_style=FOLDER_STYLES[style],
        transfer_syntax=str(TRANSFER_SYNTAXES[style]),
        vendor=style,
        mrn_style=style,
        gain=float(rng.uniform(700.0, 2400.0)),
        noise=float(rng.uniform(0.010, 0.022) * difficulty.noise_scale),
        bias=float(rng.uniform(0.08, 0.25)),
        ct_noise_hu=float(rng.uniform(8.0, 18.0)),
        mr_slope=1.25 if style == 2 else 1.0,
        inplane_mm=float(np.round(inplane, 2)),
        thickness_mm=thickness,
        gap_fraction=float(rng.choice([0.0, 0.1, 0.2])),
        stage_probabilities=tuple(float(p) for p in rng.dirichlet(np.full(4, 1.5))),
        mean_head_radius_mm=float(rng.uniform(23.0, 25.0)),
        ct_fraction=float(rng.uniform(0.70, 0.85)),
        patients=patients,
        never_acquired=never,
        sometimes_missing=sometimes,
        extra_dwi=style in (0, 2),
        difficulty=difficulty,
    )


@dataclass(frozen=True)
class PatientPlan:
    """Site-level draws for one patient (made in the parent process, so they are order-free)."""

    index: int
    patient_id: str
    stages: dict[str, int]
    labelled: dict[str, bool]
    has_ct: bool
    protocols: tuple[str, ...]
    label_stages: dict[str, int]  # what the site's reader wrote: a neighbour of the truth at times


def plan_patients(site: SiteProfile, seed: int) -> list[PatientPlan]:
    """Stages (Dirichlet-skewed per site, often bilateral), labelling, CT and protocol availability."""
    rng = np.random.default_rng([seed, site.index, 7002])
    id_rng = np.random.default_rng([seed, site.index, 7003])
    reader_rng = np.random.default_rng([seed, site.index, 7004])
    patient_ids: list[str] = []
    while len(patient_ids) < site.patients:  # MRNs are unique within a site
        mrn = ids.medical_record_number(id_rng, site.mrn_style)
        if mrn not in patient_ids:
            patient_ids.append(mrn)
    plans = []
    for index in range(site.patients):
        stages = {"R": 0, "L": 0}
        if rng.random() >= 0.10:  # 10 % controls with two healthy hips
            first = SIDES[int(rng.integers(2))]
            stages[first] = int(rng.choice(4, p=site.stage_probabilities)) + 1
            if rng.random() < 0.55:  # bilateral disease
                other = "L" if first == "R" else "R"
                stages[other] = int(rng.choice(4, p=site.stage_probabilities)) + 1
        labelled = {side: stages[side] > 0 and rng.random() < 0.85 for side in SIDES}
        has_ct = bool(rng.random() < site.ct_fraction)
        protocols = tuple(
            key
            for key in PROTOCOL_KEYS
            if key not in site.never_acquired and not rng.random() < site.sometimes_missing.get(key, 0.0)
        )
        disagreement = site.difficulty.reader_disagreement
        read = {
            side: reader_label(s, reader_rng, disagreement) if s and disagreement else s
            for side, s in stages.items()
        }
        plans.append(PatientPlan(index, patient_ids[index], stages, labelled, has_ct, protocols, read))
    return plans
