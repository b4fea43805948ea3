"""Write a federation of synthetic hospitals: per site real DICOM (MR + CT), labels.csv, and truth.

Layout (docs/architecture.md, "The synthetic federation")::

    OUT/federation.json        parameters, per-site summary
    OUT/site-NN/               a site's data folder: DICOM (site-specific folder style) + labels.csv
    OUT/site-NN.truth.json     ground truth, outside the site folder

``onfh synth --sites 4 --patients 30 --seed 0 OUT`` runs ``main``. docs/phantom.md describes the
sites, the protocols and the anatomy.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import heapq
import json
import math
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)

from common.sitedata.volume import affine_from_dicom
from simulation import identifiers as ids
from simulation import phantom

GENERATOR_VERSION = 2
SIZES = ("default", "tiny")
PROTOCOL_KEYS = ("T1_COR", "T2W_COR", "T1_AX", "T2W_AX", "PDFS_SAG")
SIDES = ("R", "L")

# Slice orientation -> ImageOrientationPatient (row direction, column direction).
ORIENTATION_COSINES = {
    "COR": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "AX": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "SAG": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
}
PROTOCOL_ORIENTATION = {"T1_COR": "COR", "T2W_COR": "COR", "T1_AX": "AX", "T2W_AX": "AX", "PDFS_SAG": "SAG"}

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


def make_site(index: int, seed: int, patients: int, size: str) -> SiteProfile:
    """Draw site ``index``'s profile from the federation ``seed``."""
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
        noise=float(rng.uniform(0.010, 0.022)),
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


def plan_patients(site: SiteProfile, seed: int) -> list[PatientPlan]:
    """Stages (Dirichlet-skewed per site, often bilateral), labelling, CT and protocol availability."""
    rng = np.random.default_rng([seed, site.index, 7002])
    id_rng = np.random.default_rng([seed, site.index, 7003])
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
        plans.append(PatientPlan(index, patient_ids[index], stages, labelled, has_ct, protocols))
    return plans


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------------------------


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


@dataclass
class StudyContext:
    """Identifiers shared by the series of one study."""

    site: SiteProfile
    seed: int
    patient_index: int
    study_key: str  # "MR" or "CT"
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    study_date: dt.date
    study_time: str
    accession: str
    study_uid: str
    frame_uid: str
    out_dir: Path
    rng: np.random.Generator  # file names only
    written: list[int] = field(default_factory=list)


def _file_path(
    ctx: StudyContext, series_number: int, description: str, series_uid: str, instance: int
) -> Path:
    style = ctx.site.folder_style
    if style == "patient/study/series":
        rel = Path(
            ctx.patient_id,
            f"{ids.dicom_date(ctx.study_date)}_{ctx.accession}",
            f"S{series_number:03d}_{_sanitise(description)}",
            f"IM{instance:04d}.dcm",
        )
    elif style == "flat-numeric":
        while True:
            rel = Path(str(int(ctx.rng.integers(10**11, 10**12))))
            if not (ctx.out_dir / rel).exists():
                break
    elif style == "date-nested":
        d = ctx.study_date
        rel = Path(
            f"{d:%Y}",
            f"{d:%m}",
            f"{d:%d}",
            ctx.accession,
            series_uid.rsplit(".", 1)[-1][-8:],
            f"{instance:05d}.dcm",
        )
    else:
        study = 1 if ctx.study_key == "MR" else 2
        rel = Path(
            "DICOM",
            f"PA{ctx.patient_index + 1:06d}",
            f"ST{study:06d}",
            f"SE{series_number:06d}",
            f"IM{instance:06d}",
        )
    return ctx.out_dir / rel


def write_series(
    ctx: StudyContext,
    modality: str,
    description: str,
    series_number: int,
    series_key: str,
    stored: np.ndarray,
    geometries: list[SeriesGeometry],
    slope: float,
    intercept: float,
    extra: dict,
) -> None:
    """Write one series, one file per slice.

    Args:
        stored: uint16 ``(S, R, C)`` stored pixel values (``value = stored * slope + intercept``).
        geometries: one geometry per slice group; a single geometry for a normal series, or one
            per image for a multi-plane localiser (each then has one slice).
        extra: further attributes (MR timing, CT kernel, ImageType ...).
    """
    site = ctx.site
    series_uid = ids.uid(ctx.seed, site.index, ctx.patient_index, ctx.study_key, series_key)
    manufacturer, model, field_t, ct_maker, ct_model = VENDORS[site.vendor]
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    syntax = site.transfer_syntax
    slices = [(g, k) for g in geometries for k in range(g.shape[0])]
    window = (float(np.percentile(stored, 99.5)) * slope + intercept) if modality == "MR" else None
    geometry = geometries[0]
    # One dataset per series; only the per-slice elements change between files (fast writing).
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if syntax == ImplicitVRLittleEndian else ExplicitVRLittleEndian
    )
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = extra.get("ImageType", ["ORIGINAL", "PRIMARY", "M" if modality == "MR" else "AXIAL"])
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ids.dicom_date(ctx.study_date)
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ctx.study_time
    ds.AccessionNumber = ctx.accession
    ds.Modality = modality
    ds.Manufacturer = manufacturer if modality == "MR" else ct_maker
    ds.InstitutionName = site.institution
    ds.ReferringPhysicianName = ""
    ds.StationName = f"{_sanitise(site.institution)[:8].upper()}{modality}{1 + site.index % 3}"
    ds.StudyDescription = "MR PELVIS / BOTH HIPS" if modality == "MR" else "CT PELVIS BONE"
    ds.SeriesDescription = description
    ds.ManufacturerModelName = model if modality == "MR" else ct_model
    ds.PatientName = ctx.patient_name
    ds.PatientID = ctx.patient_id
    ds.PatientBirthDate = ctx.birth_date
    ds.PatientSex = ctx.sex
    ds.PatientAge = ctx.age
    ds.BodyPartExamined = "HIP" if modality == "MR" else "PELVIS"
    ds.SliceThickness = f"{geometry.thickness_mm:.2f}"
    ds.SpacingBetweenSlices = f"{geometry.step_mm:.2f}"
    if modality == "MR":
        ds.MagneticFieldStrength = field_t
    for key, value in extra.items():
        if key != "ImageType":
            setattr(ds, key, value)
    ds.ProtocolName = description
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = ctx.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ctx.accession[-6:]
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = ctx.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
    ds.PixelSpacing = [f"{geometry.pixel_mm:.4f}", f"{geometry.pixel_mm:.4f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if modality == "MR":
        ds.WindowCenter, ds.WindowWidth = f"{window / 2:.1f}", f"{window:.1f}"
    else:
        ds.WindowCenter, ds.WindowWidth = "400", "1800"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = f"{slope:g}"
    if modality == "CT":
        ds.RescaleType = "HU"
    encoder = SliceEncoder(ds, syntax)
    for instance, ((geometry, k), pixels) in enumerate(zip(slices, stored, strict=True), start=1):
        position = geometry.first_position + geometry.normal * geometry.step_mm * k
        per_slice = Dataset()
        per_slice.SOPInstanceUID = ids.uid(
            ctx.seed, site.index, ctx.patient_index, ctx.study_key, series_key, instance
        )
        per_slice.InstanceNumber = instance
        per_slice.ImagePositionPatient = [f"{v:.4f}" for v in position]
        per_slice.ImageOrientationPatient = [f"{v:.6f}" for v in geometry.orientation]
        per_slice.SliceLocation = f"{float(position @ geometry.normal):.4f}"
        path = _file_path(ctx, series_number, description, series_uid, instance)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = encoder.encode(per_slice, np.ascontiguousarray(pixels, dtype=np.uint16))
        path.write_bytes(data)
        ctx.written.append(len(data))


class SliceEncoder:
    """Encodes the files of one series: the elements all slices share are encoded once.

    Produces the same bytes as building each slice's full dataset and calling
    ``Dataset.save_as(path, enforce_file_format=True)`` (tests/simulation check this), about
    five times faster, which keeps generation of a default federation within its time budget.
    """

    def __init__(self, series: Dataset, transfer_syntax: str) -> None:
        self.syntax = transfer_syntax
        self.implicit = transfer_syntax == ImplicitVRLittleEndian
        self.meta = series.file_meta
        self.meta.TransferSyntaxUID = transfer_syntax
        self.shared = [(int(elem.tag), self._element_bytes(elem)) for elem in series]
        self.pixel_template = Dataset()
        for keyword in (
            "SamplesPerPixel",
            "PhotometricInterpretation",
            "Rows",
            "Columns",
            "BitsAllocated",
            "BitsStored",
            "HighBit",
            "PixelRepresentation",
        ):
            setattr(self.pixel_template, keyword, series.data_element(keyword).value)

    def _element_bytes(self, elem: DataElement) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, self.implicit
        write_data_element(fp, elem)
        return fp.getvalue()

    def encode(self, per_slice: Dataset, pixels: np.ndarray) -> bytes:
        """The bytes of one file: shared elements plus ``per_slice`` ones plus ``pixels`` (uint16 ``(R, C)``)."""
        if self.syntax in (RLELossless, JPEGLSLossless):
            self.pixel_template.compress(self.syntax, pixels, generate_instance_uid=False)
            pixel_element = self.pixel_template["PixelData"]
        else:
            pixel_element = DataElement(0x7FE00010, "OW", pixels.tobytes())
        own = [(int(e.tag), self._element_bytes(e)) for e in per_slice]
        own.append((0x7FE00010, self._element_bytes(pixel_element)))
        self.meta.MediaStorageSOPInstanceUID = per_slice.SOPInstanceUID
        fp = DicomBytesIO()
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, self.meta, enforce_standard=True)
        body = b"".join(data for _, data in heapq.merge(self.shared, sorted(own), key=lambda item: item[0]))
        return fp.getvalue() + body


# --------------------------------------------------------------------------------------------
# One patient
# --------------------------------------------------------------------------------------------


def _series_rng(seed: int, site: int, patient: int, code: int) -> np.random.Generator:
    return np.random.default_rng([seed, site, patient, 1000 + code])


def _mr_geometries(
    site: SiteProfile, anatomy: phantom.Patient, preset: SizePreset, rng: np.random.Generator
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


def _to_stored(image: np.ndarray, slope: float, intercept: float, maximum: int = 4095) -> np.ndarray:
    return np.clip(np.rint((image - intercept) / slope), 0, maximum).astype(np.uint16)


def generate_patient(out_dir: Path, site: SiteProfile, plan: PatientPlan, seed: int, size: str) -> dict:
    """Render and write one patient's MR study (and CT study when planned).

    Returns a dict with ``truth`` (JSON-ready ground truth), ``labels`` (rows for labels.csv),
    ``files`` and ``bytes`` written.
    """
    preset = PRESETS[size]
    rng = np.random.default_rng([seed, site.index, plan.index, 0])
    anatomy = phantom.make_patient(rng, plan.stages, site.mean_head_radius_mm)
    layers = phantom.patient_layers(anatomy)
    scanner = phantom.Scanner(site.gain, site.noise, site.bias, site.ct_noise_hu)

    id_rng = np.random.default_rng([seed, site.index, plan.index, 1])
    sex = "M" if id_rng.random() < 0.7 else "F"
    mr_date = ids.random_date(id_rng, dt.date(2016, 1, 1), dt.date(2024, 12, 31))
    age = int(id_rng.integers(25, 71))
    birth = ids.random_date(
        id_rng,
        mr_date - dt.timedelta(days=round(365.25 * (age + 1)) - 1),
        mr_date - dt.timedelta(days=round(365.25 * age)),
    )
    patient_name = ids.person_name(id_rng, sex)
    patient_id = plan.patient_id

    def study(key: str, date: dt.date) -> StudyContext:
        return StudyContext(
            site=site, seed=seed, patient_index=plan.index, study_key=key, patient_name=patient_name,
            patient_id=patient_id, birth_date=ids.dicom_date(birth), sex=sex, age=f"{age:03d}Y",
            study_date=date, study_time=ids.dicom_time(id_rng),
            accession=ids.accession_number(id_rng, "RM" if key == "MR" else "RC", date),
            study_uid=ids.uid(seed, site.index, plan.index, key, "study"),
            frame_uid=ids.uid(seed, site.index, plan.index, key, "frame"), out_dir=out_dir,
            rng=np.random.default_rng([seed, site.index, plan.index, 2 if key == "MR" else 3]),
        )  # fmt: skip

    mr = study("MR", mr_date)
    names = NAMING_SCHEMES[site.naming]
    geometries = _mr_geometries(site, anatomy, preset, _series_rng(seed, site.index, plan.index, 0))
    maps: dict[str, phantom.TissueMap] = {}
    for number, key in enumerate(PROTOCOL_KEYS, start=2):
        if key not in plan.protocols:
            continue
        plane = PROTOCOL_ORIENTATION[key]
        geometry = geometries[plane]
        if plane not in maps:
            maps[plane] = phantom.TissueMap(
                layers, phantom.Grid(geometry.affine, geometry.shape, geometry.thickness_mm)
            )
        protocol = phantom.MR_PROTOCOLS[key]
        image = phantom.mr_image(
            maps[plane], protocol, scanner, _series_rng(seed, site.index, plan.index, number)
        )
        extra = {
            "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"] if protocol.fat_residual < 1 else "SK",
            "ScanOptions": "FS" if protocol.fat_residual < 1 else "", "MRAcquisitionType": "2D",
            "RepetitionTime": f"{protocol.tr_ms:g}", "EchoTime": f"{protocol.te_ms:g}",
            "EchoTrainLength": 3 if key.startswith("T1") else 15,
        }  # fmt: skip
        write_series(
            mr,
            "MR",
            names[key],
            number,
            key,
            _to_stored(image, site.mr_slope, 0.0),
            [geometry],
            site.mr_slope,
            0.0,
            extra,
        )
    _write_extras(mr, site, anatomy, layers, scanner, preset, seed, plan)

    truth = {
        "patient_id": patient_id,
        "patient_index": plan.index,
        "has_ct": plan.has_ct,
        "protocols": list(plan.protocols),
        "hips": {side: anatomy.hips[side].truth() for side in ("L", "R")},
        "mr_study_uid": mr.study_uid,
    }
    for side in ("L", "R"):
        truth["hips"][side]["labelled"] = bool(plan.labelled[side])

    written = list(mr.written)
    if plan.has_ct:
        ct_rng = _series_rng(seed, site.index, plan.index, 50)
        translation = ct_rng.normal(size=3)
        translation = translation / np.linalg.norm(translation) * ct_rng.uniform(0.0, 10.0)
        rotation = ct_rng.uniform(-4.0, 4.0, size=3)
        # Rounded first, so the truth's numbers are exactly the offset the CT was rendered with.
        translation, rotation = np.round(translation, 4), np.round(rotation, 4)
        offset = rigid_matrix(rotation, translation)
        ct_date = mr_date + dt.timedelta(days=int(ct_rng.integers(-120, 121)))
        ct = study("CT", ct_date)
        mid = np.stack([anatomy.hips[s].centre for s in SIDES]).mean(axis=0)
        centre_ct = (
            offset[:3, :3] @ mid
            + offset[:3, 3]
            + ct_rng.uniform(-preset.fov_jitter_mm, preset.fov_jitter_mm, 3)
        )
        centre_ct[0] = ct_rng.uniform(-2.0, 2.0)
        centre_ct[1] += 0.1 * preset.ct_fov[1]
        pixel = float(np.round(ct_rng.uniform(*preset.ct_pixel_mm), 3))
        thickness = float(ct_rng.choice(np.unique(preset.ct_thickness_mm)))
        w, h, slab = preset.ct_fov
        geometry = box_geometry("AX", centre_ct, w, h, slab, pixel, thickness, thickness)
        grid_affine = np.linalg.inv(offset) @ geometry.affine  # CT voxel -> MR-session (anatomy) mm
        tissue_map = phantom.TissueMap(layers, phantom.Grid(grid_affine, geometry.shape, thickness))
        hu = phantom.ct_image(tissue_map, scanner, _series_rng(seed, site.index, plan.index, 51))
        extra = {
            "KVP": "120",
            "ConvolutionKernel": "B60f" if site.vendor != 1 else "BONE",
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        }
        write_series(
            ct,
            "CT",
            "Hip bone 3.0 axial" if site.naming != 1 else "BONE PLUS AX",
            2,
            "CT",
            _to_stored(hu, 1.0, -1024.0),
            [geometry],
            1.0,
            -1024.0,
            extra,
        )
        truth["ct_offset"] = {
            "matrix": offset.tolist(),
            "translation_mm": translation.tolist(),
            "rotation_deg": rotation.tolist(),
            "rotation_order": "R = Rz @ Ry @ Rx about the MR-session origin",
        }
        truth["ct_study_uid"] = ct.study_uid
        written += ct.written
    else:
        truth["ct_offset"] = None

    labels = []
    for side in ("L", "R"):
        stage = plan.stages[side]
        labels.append(
            {"patient_id": patient_id, "side": side, "arco_stage": str(stage) if plan.labelled[side] else ""}
        )
    return {"truth": truth, "labels": labels, "files": len(written), "bytes": int(sum(written))}


def _write_extras(
    ctx: StudyContext,
    site: SiteProfile,
    anatomy: phantom.Patient,
    layers: list[phantom.Layer],
    scanner: phantom.Scanner,
    preset: SizePreset,
    seed: int,
    plan: PatientPlan,
) -> None:
    """Series a real PACS study also holds and ingestion must ignore: 3-plane localiser, DWI."""
    names = NAMING_SCHEMES[site.naming]
    mid = np.stack([anatomy.hips[s].centre for s in SIDES]).mean(axis=0)
    matrix, pixel = preset.localizer
    planes = []
    for plane in ("SAG", "COR", "AX"):
        centre = mid.copy()
        if plane == "SAG":
            centre[0] = 0.0
        planes.append(box_geometry(plane, centre, matrix * pixel, matrix * pixel, 0.0, pixel, 8.0, 8.0))
    protocol = phantom.MR_PROTOCOLS["LOCALIZER"]
    rng = _series_rng(seed, site.index, plan.index, 40)
    images = [
        phantom.mr_image(
            phantom.TissueMap(layers, phantom.Grid(g.affine, g.shape, 8.0)), protocol, scanner, rng
        )
        for g in planes
    ]
    stored = _to_stored(np.concatenate(images) * 20.0, site.mr_slope, 0.0)
    extra = {
        "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
        "ScanningSequence": "GR",
        "SequenceVariant": "SP",
        "RepetitionTime": "8",
        "EchoTime": "4",
    }
    write_series(ctx, "MR", names["LOCALIZER"], 1, "LOCALIZER", stored, planes, site.mr_slope, 0.0, extra)
    if site.extra_dwi:
        geometry = box_geometry(
            "AX", mid, 300.0, 200.0, 60.0, 3.4 if preset is PRESETS["default"] else 5.0, 6.0, 6.0
        )
        tissue_map = phantom.TissueMap(layers, phantom.Grid(geometry.affine, geometry.shape, 6.0))
        image = phantom.mr_image(
            tissue_map, phantom.MR_PROTOCOLS["DWI"], scanner, _series_rng(seed, site.index, plan.index, 41)
        )
        extra = {
            "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"],
            "ScanningSequence": "EP",
            "SequenceVariant": "SK",
            "RepetitionTime": "5000",
            "EchoTime": "90",
        }
        write_series(
            ctx,
            "MR",
            names["DWI"],
            20,
            "DWI",
            _to_stored(image * 0.6, site.mr_slope, 0.0),
            [geometry],
            site.mr_slope,
            0.0,
            extra,
        )


def _patient_job(args: tuple) -> tuple[int, int, dict]:
    out_dir, site, plan, seed, size = args
    return site.index, plan.index, generate_patient(out_dir, site, plan, seed, size)


# --------------------------------------------------------------------------------------------
# The federation
# --------------------------------------------------------------------------------------------


def _site_counts(sites: int, patients: int, size_skew: float) -> list[int]:
    """Patients per site: ``patients`` each, or linearly skewed by ``size_skew`` (0-0.9)."""
    if sites == 1 or size_skew == 0:
        return [patients] * sites
    return [
        max(2, int(round(patients * (1.0 + size_skew * (2.0 * i / (sites - 1) - 1.0))))) for i in range(sites)
    ]


def _parameters(sites: int, patients: int, seed: int, size: str, size_skew: float) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sites": sites,
        "patients": patients,
        "size": size,
        "size_skew": size_skew,
    }


def _is_complete(out_dir: Path, parameters: dict) -> bool:
    manifest = out_dir / "federation.json"
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(data.get("complete")) and data.get("parameters") == parameters


def generate_federation(
    out_dir: Path,
    sites: int = 4,
    patients: int = 30,
    seed: int = 0,
    size: str = "default",
    workers: int | None = None,
    size_skew: float = 0.0,
) -> Path:
    """Write ``sites`` synthetic hospitals with ``patients`` each under ``out_dir``; return ``out_dir``.

    A folder that already holds a complete federation with the same parameters is reused as is.
    A folder holding an incomplete or different federation written by this generator is
    regenerated; any other non-empty folder is refused.

    Args:
        out_dir: output folder (created).
        sites, patients: federation size; ``size_skew`` in [0, 0.9] spreads patient counts
            linearly from ``patients*(1-skew)`` (site-00) to ``patients*(1+skew)`` (last site).
        seed: everything (anatomy, stages, noise, identifiers, UIDs) follows from it.
        size: ``"default"`` (realistic resolutions) or ``"tiny"`` (coarse, for tests).
        workers: processes (default: CPU count); 1 renders in this process.
    """
    out_dir = Path(out_dir)
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if sites < 1 or patients < 1:
        raise ValueError(f"need at least one site and one patient, got sites={sites}, patients={patients}")
    if not 0.0 <= size_skew <= 0.9:
        raise ValueError(f"size_skew must be in [0, 0.9], got {size_skew}")
    parameters = _parameters(sites, patients, seed, size, size_skew)
    if _is_complete(out_dir, parameters):
        print(f"synth: {out_dir} already holds this federation; reusing it", flush=True)
        return out_dir
    _prepare_folder(out_dir)
    start = time.perf_counter()
    (out_dir / "federation.json").write_text(
        json.dumps({"parameters": parameters, "complete": False}, indent=2)
    )

    counts = _site_counts(sites, patients, size_skew)
    profiles = [make_site(i, seed, counts[i], size) for i in range(sites)]
    plans = {p.index: plan_patients(p, seed) for p in profiles}
    jobs = [(out_dir / p.name, p, plan, seed, size) for p in profiles for plan in plans[p.index]]
    results: dict[int, dict[int, dict]] = {p.index: {} for p in profiles}
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))

    def collect(site_index: int, patient_index: int, result: dict) -> None:
        results[site_index][patient_index] = result
        if len(results[site_index]) == counts[site_index]:
            done = results[site_index].values()
            megabytes = sum(r["bytes"] for r in done) / 1e6
            print(
                f"synth: {profiles[site_index].name}: {counts[site_index]} patients, "
                f"{sum(r['files'] for r in done)} files, {megabytes:.0f} MB ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    if workers == 1:
        for job in jobs:
            collect(*_patient_job(job))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_patient_job, job) for job in jobs]):
                collect(*future.result())

    summary = []
    for profile in profiles:
        site_results = [results[profile.index][i] for i in range(profile.patients)]
        _write_labels(out_dir / profile.name / "labels.csv", site_results)
        truth = [r["truth"] for r in site_results]
        (out_dir / f"{profile.name}.truth.json").write_text(json.dumps(truth, indent=1))
        summary.append(_site_summary(profile, site_results))
    total_bytes = sum(s["bytes"] for s in summary)
    manifest = {
        "parameters": parameters,
        "complete": True,
        "generator": "simulation.synth (onfh synth)",
        "seconds": round(time.perf_counter() - start, 1),
        "bytes": total_bytes,
        "files": sum(s["files"] for s in summary),
        "sites": summary,
    }
    (out_dir / "federation.json").write_text(json.dumps(manifest, indent=2))
    print(
        f"synth: wrote {sites} sites, {manifest['files']} files, {total_bytes / 1e6:.0f} MB in {manifest['seconds']} s -> {out_dir}",
        flush=True,
    )
    return out_dir


def _prepare_folder(out_dir: Path) -> None:
    """Make ``out_dir`` ready: create it, or clear a previous run of this generator."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file; give a folder for the synthetic federation")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list(out_dir.iterdir())
    if not entries:
        return
    if not (out_dir / "federation.json").is_file():
        raise ValueError(
            f"{out_dir} is not empty and holds no federation.json from `onfh synth`; "
            "give an empty or new folder so nothing of yours is overwritten"
        )
    for entry in entries:
        if entry.is_dir() and re.fullmatch(r"site-\d+", entry.name):
            shutil.rmtree(entry)
        elif entry.name.endswith(".truth.json") or entry.name == "federation.json":
            entry.unlink()


def _write_labels(path: Path, results: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["patient_id", "side", "arco_stage"])
        writer.writeheader()
        for result in results:
            writer.writerows(result["labels"])


def _site_summary(profile: SiteProfile, results: list[dict]) -> dict:
    stages = [h["stage"] for r in results for h in r["truth"]["hips"].values()]
    info = asdict(profile)
    info.update(
        {
            "files": sum(r["files"] for r in results),
            "bytes": sum(r["bytes"] for r in results),
            "with_ct": sum(r["truth"]["has_ct"] for r in results),
            "hips_per_stage": {str(s): stages.count(s) for s in range(5)},
            "labelled_hips": sum(1 for r in results for row in r["labels"] if row["arco_stage"]),
            "series_descriptions": NAMING_SCHEMES[profile.naming],
        }
    )
    return info


def main(argv: list[str] | None = None) -> int:
    """``onfh synth [--sites N] [--patients N] [--seed S] [--size default|tiny] OUT``."""
    parser = argparse.ArgumentParser(
        prog="onfh synth", description="Write synthetic hospitals as DICOM + labels.csv (+ truth beside)."
    )
    parser.add_argument(
        "out", type=Path, help="output folder (new, empty, or an earlier `onfh synth` output)"
    )
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--patients", type=int, default=30, help="patients per site")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size", choices=SIZES, default="default", help="'tiny' = coarse and fast, for tests"
    )
    parser.add_argument(
        "--size-skew", type=float, default=0.0, help="0-0.9: spread patient counts across sites"
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    args = parser.parse_args(argv)
    try:
        generate_federation(
            args.out, args.sites, args.patients, args.seed, args.size, args.workers, args.size_skew
        )
    except ValueError as exc:
        print(f"onfh synth: {exc}", file=sys.stderr)
        return 2
    return 0
