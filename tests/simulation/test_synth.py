"""Tests of the synthetic federation writer: DICOM files, geometry, labels, truth, reuse."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)

from common.sitedata.volume import Volume, affine_from_dicom
from simulation.synth.dicom_writer import SliceEncoder
from simulation.synth.federation import generate_federation, main
from simulation.synth.geometry import ORIENTATION_COSINES, PROTOCOL_ORIENTATION, rigid_matrix
from simulation.synth.patient import generate_patient
from simulation.synth.plan import NAMING_SCHEMES, PROTOCOL_KEYS, make_site, plan_patients

SITES, PATIENTS = 4, 2


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fed")
    return generate_federation(out, sites=SITES, patients=PATIENTS, seed=11, size="tiny", workers=1)


def _series(site_dir: Path) -> dict[tuple[str, str], list[Dataset]]:
    """(PatientID, SeriesInstanceUID) -> datasets with pixels."""
    series = defaultdict(list)
    for path in site_dir.rglob("*"):
        if path.is_file() and path.name != "labels.csv":
            ds = pydicom.dcmread(path)
            series[(ds.PatientID, ds.SeriesInstanceUID)].append(ds)
    return series


def _volume(datasets: list[Dataset]) -> Volume:
    orientation = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    datasets = sorted(
        datasets, key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float)))
    )
    pixels = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    first = np.array(datasets[0].ImagePositionPatient, dtype=float)
    step = normal * float(datasets[0].SpacingBetweenSlices)
    affine = affine_from_dicom(first, orientation, [float(v) for v in datasets[0].PixelSpacing], step)
    return Volume(pixels.astype(np.float32), affine, datasets[0].Modality)


def _truth(federation: Path, site: int) -> list[dict]:
    return json.loads((federation / f"site-{site:02d}.truth.json").read_text())


def _protocol_of(description: str, site: int) -> str | None:
    names = NAMING_SCHEMES[make_site(site, 11, PATIENTS, "tiny").naming]
    keys = [k for k, v in names.items() if v == description]
    return keys[0] if keys else None


def test_layout_and_manifest(federation):
    manifest = json.loads((federation / "federation.json").read_text())
    assert manifest["complete"] and manifest["parameters"]["sites"] == SITES
    for site in range(SITES):
        assert (federation / f"site-{site:02d}" / "labels.csv").is_file()
        assert len(_truth(federation, site)) == PATIENTS
    assert not list(federation.glob("site-00/*.truth.json"))  # truth stays outside the site folder


def test_labels_agree_with_truth(federation):
    for site in range(SITES):
        truth = {p["patient_id"]: p for p in _truth(federation, site)}
        with (federation / f"site-{site:02d}" / "labels.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert rows and set(rows[0]) == {"patient_id", "side", "arco_stage"}
        for row in rows:
            hip = truth[row["patient_id"]]["hips"][row["side"]]
            if row["arco_stage"]:
                assert int(row["arco_stage"]) == hip["stage"] and 1 <= hip["stage"] <= 4
            else:
                assert hip["stage"] == 0 or not hip["labelled"]


def test_dicom_files_geometry_and_transfer_syntaxes(federation):
    expected_syntax = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEGLSLossless]
    for site in range(SITES):
        series = _series(federation / f"site-{site:02d}")
        truth = {p["patient_id"]: p for p in _truth(federation, site)}
        seen = set()
        for (patient_id, _), datasets in series.items():
            ds = datasets[0]
            assert ds.file_meta.TransferSyntaxUID == expected_syntax[site]
            assert ds.PatientName and ds.StudyInstanceUID and ds.AccessionNumber and ds.InstitutionName
            if ds.Modality == "CT":
                assert float(ds.RescaleIntercept) == -1024
                continue
            key = _protocol_of(ds.SeriesDescription, site)
            if key not in PROTOCOL_KEYS:
                continue  # localiser, DWI
            seen.add((patient_id, key))
            assert (
                tuple(float(v) for v in ds.ImageOrientationPatient)
                == ORIENTATION_COSINES[PROTOCOL_ORIENTATION[key]]
            )
            volume = _volume(datasets)
            assert volume.orientation == PROTOCOL_ORIENTATION[key]
            # Every protocol covers the hip crop (64 mm in-plane, 40 mm through-plane) of both heads.
            for side in "LR":
                centre = np.array(truth[patient_id]["hips"][side]["centre_mm"])
                offsets = np.array(np.meshgrid(*[[-32.0, 32.0]] * 3, indexing="ij")).reshape(3, -1).T
                offsets[:, np.argmax(np.abs(volume.normal))] *= 20.0 / 32.0
                index = volume.world_to_index(centre + offsets)
                assert (index >= -0.5).all() and (index <= np.array(volume.pixels.shape) - 0.5).all()
        for patient in truth.values():
            assert {(patient["patient_id"], k) for k in patient["protocols"]} <= seen


def test_head_is_at_truth_centre_in_t1_cor(federation):
    series = _series(federation / "site-00")
    for patient in _truth(federation, 0):
        t1 = next(
            d
            for (pid, _), d in series.items()
            if pid == patient["patient_id"] and d[0].SeriesDescription == "t1_tse_cor"
        )
        volume = _volume(t1)
        for side in "LR":
            hip = patient["hips"][side]
            centre, radius = np.array(hip["centre_mm"]), hip["radius_mm"]
            # Profile along x (inferior half of the head, clear of the anterosuperior lesion).
            xs = np.arange(-radius - 10, radius + 10.5, 0.5)
            points = centre + np.stack([xs, np.zeros_like(xs), np.full_like(xs, -0.4 * radius)], axis=1)
            profile = volume.sample(points)
            inside = profile[np.abs(xs) < 0.6 * radius].mean()
            rim = profile[np.abs(np.abs(xs) - (0.92 * radius + hip["joint_gap_mm"] / 2)) < 1.5].mean()
            assert inside > 1.3 * rim


def test_ct_offset_is_rigid_and_maps_mr_to_ct(federation):
    checked = 0
    for site in range(SITES):
        series = _series(federation / f"site-{site:02d}")
        for patient in _truth(federation, site):
            if not patient["has_ct"]:
                assert patient["ct_offset"] is None
                continue
            offset = patient["ct_offset"]
            matrix = np.array(offset["matrix"])
            rotation = matrix[:3, :3]
            np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-5)
            assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-5)
            np.testing.assert_allclose(
                matrix, rigid_matrix(offset["rotation_deg"], offset["translation_mm"]), atol=1e-5
            )
            assert (
                np.linalg.norm(offset["translation_mm"]) <= 10.0 + 1e-6
                and np.abs(offset["rotation_deg"]).max() <= 4.0
            )
            ct = next(
                d for (pid, _), d in series.items() if pid == patient["patient_id"] and d[0].Modality == "CT"
            )
            volume = _volume(ct)
            for side in "LR":
                hip = patient["hips"][side]
                centre = np.array(hip["centre_mm"])
                # Fatty marrow (about 250 HU) inside the head at the mapped position in the CT session,
                # sampled away from the anterosuperior lesion.
                directions = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, 0, -1]], dtype=float)
                inner = volume.sample(
                    (centre + 0.5 * hip["radius_mm"] * directions) @ rotation.T + matrix[:3, 3]
                )
                if hip["stage"] == 0:
                    assert np.all(np.abs(inner - 250) < 150)
                else:  # necrotic marrow, sclerotic halo or rim: still bone, never soft tissue
                    assert np.all((inner > 150) & (inner < 1200))
            checked += 1
    assert checked > 0


def test_same_seed_gives_identical_files(tmp_path):
    site = make_site(2, 5, 1, "tiny")  # RLE site with date-nested folders
    plan = plan_patients(site, 5)[0]
    contents = []
    for name in ("a", "b"):
        out = tmp_path / name
        generate_patient(out, site, plan, 5, "tiny")
        contents.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert contents[0] == contents[1] and len(contents[0]) > 10


def test_reuse_and_refusal(federation, tmp_path, capsys):
    manifest = federation / "federation.json"
    before = manifest.stat().st_mtime_ns
    assert generate_federation(federation, sites=SITES, patients=PATIENTS, seed=11, size="tiny") == federation
    assert manifest.stat().st_mtime_ns == before
    assert "reusing" in capsys.readouterr().out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate_federation(foreign, sites=1, patients=1, size="tiny")


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEGLSLossless]
)
def test_slice_encoder_matches_pydicom_save_as(tmp_path, syntax):
    series = Dataset()
    series.file_meta = FileMetaDataset()
    series.file_meta.MediaStorageSOPClassUID = MRImageStorage
    series.SOPClassUID = MRImageStorage
    series.PatientName = "KIM^MINJUN"
    series.SeriesDescription = "t1_tse_cor"
    series.Modality = "MR"
    series.SamplesPerPixel, series.PhotometricInterpretation = 1, "MONOCHROME2"
    series.Rows, series.Columns = 6, 5
    series.BitsAllocated, series.BitsStored, series.HighBit, series.PixelRepresentation = 16, 12, 11, 0
    series.RescaleSlope, series.RescaleIntercept = "1.25", "0"
    encoder = SliceEncoder(series, syntax)
    pixels = (np.arange(30).reshape(6, 5) * 97 % 4096).astype(np.uint16)
    per_slice = Dataset()
    per_slice.SOPInstanceUID = "1.2.3.4"
    per_slice.InstanceNumber = 3
    per_slice.ImagePositionPatient = ["1.0", "2.0", "3.0"]
    fast = encoder.encode(per_slice, pixels)

    reference = Dataset()
    reference.update(series)
    reference.update(per_slice)
    reference.file_meta = FileMetaDataset()
    reference.file_meta.MediaStorageSOPClassUID = MRImageStorage
    reference.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    reference.file_meta.TransferSyntaxUID = (
        syntax if syntax == ImplicitVRLittleEndian else ExplicitVRLittleEndian
    )
    if syntax in (RLELossless, JPEGLSLossless):
        reference.compress(syntax, pixels, generate_instance_uid=False)
    else:
        reference.PixelData = pixels.tobytes()
        reference["PixelData"].VR = "OW"
    path = tmp_path / "reference.dcm"
    reference.save_as(path, enforce_file_format=True)
    assert fast == path.read_bytes()
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, pixels)


def test_series_names_map_to_protocol_keys_with_default_rules():
    protocols = pytest.importorskip("common.sitedata.protocols")
    rules = protocols.ProtocolRules.default()
    for names in NAMING_SCHEMES:
        for key, description in names.items():
            orientation = PROTOCOL_ORIENTATION.get(key, "AX" if key == "DWI" else "COR")
            expected = key if key in PROTOCOL_KEYS else None
            assert rules.match(description, orientation, "MR") == expected, description


def test_cli_writes_a_site(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--sites", "1", "--patients", "1", "--size", "tiny", "--workers", "1", str(out)]) == 0
    assert (out / "site-00" / "labels.csv").is_file() and (out / "site-00.truth.json").is_file()
    assert "site-00" in capsys.readouterr().out
    assert main(["--size", "tiny", str(tmp_path / "cli" / "site-00")]) == 2  # non-empty foreign folder


def test_site_plans_have_unique_ids_skewed_stages_and_missing_protocols():
    for index in range(4):
        site = make_site(index, 0, 200, "default")
        plans = plan_patients(site, 0)
        assert len({p.patient_id for p in plans}) == 200
        with_ct = sum(p.has_ct for p in plans) / 200
        assert 0.6 < with_ct < 0.95
        assert all("T1_COR" in p.protocols for p in plans)
        if index == 1:
            assert not any("PDFS_SAG" in p.protocols for p in plans)
        diseased = [s for p in plans for s in p.stages.values() if s > 0]
        bilateral = sum(all(s > 0 for s in p.stages.values()) for p in plans)
        assert bilateral > 50 and set(diseased) <= {1, 2, 3, 4}
