"""One synthetic patient: anatomy and identity drawn, MR study (and CT study) rendered, written as DICOM."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from simulation import identifiers as ids
from simulation.phantom.anatomy import make_patient
from simulation.phantom.layers import patient_layers
from simulation.phantom.render import Grid, Scanner, TissueMap, ct_image, mr_image
from simulation.phantom.tissues import MR_PROTOCOLS
from simulation.synth.dicom_writer import StudyContext, to_stored, write_series
from simulation.synth.geometry import (
    PROTOCOL_ORIENTATION,
    box_geometry,
    ct_geometry,
    ct_session_offset,
    head_midpoint,
    localizer_geometries,
    mr_geometries,
)
from simulation.synth.plan import NAMING_SCHEMES, PRESETS, PROTOCOL_KEYS, PatientPlan, SiteProfile


def _series_rng(seed: int, site: int, patient: int, code: int) -> np.random.Generator:
    return np.random.default_rng([seed, site, patient, 1000 + code])


class PatientWriter:
    """Draws one patient (anatomy, scanner, identity) and writes its studies.

    Every random draw comes from a generator seeded by ``(seed, site, patient, purpose)``, so
    the files do not depend on which process writes which patient, or in what order.
    """

    def __init__(self, out_dir: Path, site: SiteProfile, plan: PatientPlan, seed: int, size: str) -> None:
        self.out_dir, self.site, self.plan, self.seed = out_dir, site, plan, seed
        self.preset = PRESETS[size]
        rng = np.random.default_rng([seed, site.index, plan.index, 0])
        cue_rng = np.random.default_rng([seed, site.index, plan.index, 5])
        self.anatomy = make_patient(rng, plan.stages, site.mean_head_radius_mm, site.difficulty, cue_rng)
        self.layers = patient_layers(self.anatomy)
        difficulty = site.difficulty
        self.scanner = Scanner(
            site.gain,
            site.noise,
            site.bias,
            site.ct_noise_hu,
            difficulty.mr_lesion_contrast,
            difficulty.ct_shows_lesions,
        )
        # Identity: drawn in this order, then each study's time and accession from the same RNG.
        self.id_rng = np.random.default_rng([seed, site.index, plan.index, 1])
        self.sex = "M" if self.id_rng.random() < 0.7 else "F"
        self.mr_date = ids.random_date(self.id_rng, dt.date(2016, 1, 1), dt.date(2024, 12, 31))
        self.age = int(self.id_rng.integers(25, 71))
        self.birth = ids.random_date(
            self.id_rng,
            self.mr_date - dt.timedelta(days=round(365.25 * (self.age + 1)) - 1),
            self.mr_date - dt.timedelta(days=round(365.25 * self.age)),
        )
        self.patient_name = ids.person_name(self.id_rng, self.sex)

    def series_rng(self, code: int) -> np.random.Generator:
        return _series_rng(self.seed, self.site.index, self.plan.index, code)

    def study(self, key: str, date: dt.date) -> StudyContext:
        """The identifiers of the patient's ``"MR"`` or ``"CT"`` study on ``date``."""
        seed, site, plan = self.seed, self.site, self.plan
        return StudyContext(
            site=site, seed=seed, patient_index=plan.index, study_key=key, patient_name=self.patient_name,
            patient_id=plan.patient_id, birth_date=ids.dicom_date(self.birth), sex=self.sex,
            age=f"{self.age:03d}Y", study_date=date, study_time=ids.dicom_time(self.id_rng),
            accession=ids.accession_number(self.id_rng, "RM" if key == "MR" else "RC", date),
            study_uid=ids.uid(seed, site.index, plan.index, key, "study"),
            frame_uid=ids.uid(seed, site.index, plan.index, key, "frame"), out_dir=self.out_dir,
            rng=np.random.default_rng([seed, site.index, plan.index, 2 if key == "MR" else 3]),
        )  # fmt: skip

    def write_mr(self, mr: StudyContext) -> None:
        """The planned MR protocols (series 2-6); T1 and T2 of one plane share one tissue map."""
        site = self.site
        names = NAMING_SCHEMES[site.naming]
        geometries = mr_geometries(site, self.anatomy, self.preset, self.series_rng(0))
        maps: dict[str, TissueMap] = {}
        for number, key in enumerate(PROTOCOL_KEYS, start=2):
            if key not in self.plan.protocols:
                continue
            plane = PROTOCOL_ORIENTATION[key]
            geometry = geometries[plane]
            if plane not in maps:
                maps[plane] = TissueMap(
                    self.layers, Grid(geometry.affine, geometry.shape, geometry.thickness_mm)
                )
            protocol = MR_PROTOCOLS[key]
            image = mr_image(maps[plane], protocol, self.scanner, self.series_rng(number))
            extra = {
                "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"] if protocol.fat_residual < 1 else "SK",
                "ScanOptions": "FS" if protocol.fat_residual < 1 else "", "MRAcquisitionType": "2D",
                "RepetitionTime": f"{protocol.tr_ms:g}", "EchoTime": f"{protocol.te_ms:g}",
                "EchoTrainLength": 3 if key.startswith("T1") else 15,
            }  # fmt: skip
            stored = to_stored(image, site.mr_slope, 0.0)
            write_series(mr, "MR", names[key], number, key, stored, [geometry], site.mr_slope, 0.0, extra)

    def write_extras(self, mr: StudyContext) -> None:
        """Series a real PACS study also holds and ingestion must ignore: 3-plane localiser, DWI."""
        site, layers, scanner = self.site, self.layers, self.scanner
        names = NAMING_SCHEMES[site.naming]
        planes = localizer_geometries(self.anatomy, self.preset)
        protocol = MR_PROTOCOLS["LOCALIZER"]
        rng = self.series_rng(40)
        images = [
            mr_image(TissueMap(layers, Grid(g.affine, g.shape, 8.0)), protocol, scanner, rng) for g in planes
        ]
        stored = to_stored(np.concatenate(images) * 20.0, site.mr_slope, 0.0)
        extra = {
            "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
            "ScanningSequence": "GR",
            "SequenceVariant": "SP",
            "RepetitionTime": "8",
            "EchoTime": "4",
        }
        write_series(mr, "MR", names["LOCALIZER"], 1, "LOCALIZER", stored, planes, site.mr_slope, 0.0, extra)
        if not site.extra_dwi:
            return
        pixel = 3.4 if self.preset is PRESETS["default"] else 5.0
        geometry = box_geometry("AX", head_midpoint(self.anatomy), 300.0, 200.0, 60.0, pixel, 6.0, 6.0)
        tissue_map = TissueMap(layers, Grid(geometry.affine, geometry.shape, 6.0))
        image = mr_image(tissue_map, MR_PROTOCOLS["DWI"], scanner, self.series_rng(41))
        extra = {
            "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"],
            "ScanningSequence": "EP",
            "SequenceVariant": "SK",
            "RepetitionTime": "5000",
            "EchoTime": "90",
        }
        stored = to_stored(image * 0.6, site.mr_slope, 0.0)
        write_series(mr, "MR", names["DWI"], 20, "DWI", stored, [geometry], site.mr_slope, 0.0, extra)

    def write_ct(self) -> tuple[StudyContext, dict]:
        """The CT study, in a session rigidly offset from the MR one: its context and the offset's truth."""
        site = self.site
        ct_rng = self.series_rng(50)
        offset, translation, rotation = ct_session_offset(ct_rng)
        ct = self.study("CT", self.mr_date + dt.timedelta(days=int(ct_rng.integers(-120, 121))))
        geometry = ct_geometry(self.anatomy, offset, self.preset, ct_rng)
        grid_affine = np.linalg.inv(offset) @ geometry.affine  # CT voxel -> MR-session (anatomy) mm
        tissue_map = TissueMap(self.layers, Grid(grid_affine, geometry.shape, geometry.thickness_mm))
        hu = ct_image(tissue_map, self.scanner, self.series_rng(51))
        extra = {
            "KVP": "120",
            "ConvolutionKernel": "B60f" if site.vendor != 1 else "BONE",
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        }
        description = "Hip bone 3.0 axial" if site.naming != 1 else "BONE PLUS AX"
        write_series(
            ct, "CT", description, 2, "CT", to_stored(hu, 1.0, -1024.0), [geometry], 1.0, -1024.0, extra
        )
        offset_truth = {
            "matrix": offset.tolist(),
            "translation_mm": translation.tolist(),
            "rotation_deg": rotation.tolist(),
            "rotation_order": "R = Rz @ Ry @ Rx about the MR-session origin",
        }
        return ct, offset_truth

    def labels(self) -> list[dict]:
        """Rows of labels.csv: both hips, the stage blank where unlabelled (healthy or scarce labels)."""
        plan = self.plan
        return [
            {
                "patient_id": plan.patient_id,
                "side": side,
                "arco_stage": str(plan.label_stages[side]) if plan.labelled[side] else "",
            }
            for side in ("L", "R")
        ]


def generate_patient(out_dir: Path, site: SiteProfile, plan: PatientPlan, seed: int, size: str) -> dict:
    """Render and write one patient's MR study (and CT study when planned).

    Returns a dict with ``truth`` (JSON-ready ground truth), ``labels`` (rows for labels.csv),
    ``files`` and ``bytes`` written.
    """
    writer = PatientWriter(out_dir, site, plan, seed, size)
    mr = writer.study("MR", writer.mr_date)
    writer.write_mr(mr)
    writer.write_extras(mr)
    truth = {
        "patient_id": plan.patient_id,
        "patient_index": plan.index,
        "has_ct": plan.has_ct,
        "protocols": list(plan.protocols),
        "hips": {side: writer.anatomy.hips[side].truth() for side in ("L", "R")},
        "mr_study_uid": mr.study_uid,
    }
    for side in ("L", "R"):
        truth["hips"][side]["labelled"] = bool(plan.labelled[side])
        truth["hips"][side]["label_stage"] = plan.label_stages[side]  # the reader's stage
    written = list(mr.written)
    if plan.has_ct:
        ct, truth["ct_offset"] = writer.write_ct()
        truth["ct_study_uid"] = ct.study_uid
        written += ct.written
    else:
        truth["ct_offset"] = None
    return {"truth": truth, "labels": writer.labels(), "files": len(written), "bytes": int(sum(written))}


def patient_job(args: tuple) -> tuple[int, int, dict]:
    """``generate_patient`` for a process pool: ``(site index, patient index, result)``."""
    out_dir, site, plan, seed, size = args
    return site.index, plan.index, generate_patient(out_dir, site, plan, seed, size)
