"""Tests of DICOM ingestion: transfer syntaxes, slice order, geometry, multi-frame and bad input."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid

from common.problems import ProblemLog
from common.sitedata.dicom import (
    SeriesInfo,
    decoder_hint,
    load_volume,
    scan_site,
    supported_transfer_syntaxes,
)
from tests.common.conftest import (
    WrittenSeries,
    write_classic_multiframe,
    write_enhanced_mr,
    write_series,
    write_structured_report,
)

LOSSLESS = [
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.RLELossless,
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.JPEGLosslessSV1,
]


def only_series(site: Path, log: ProblemLog | None = None) -> SeriesInfo:
    """Scan ``site`` and return its single series in use."""
    scan = scan_site(site, log=log)
    series = [s for p in scan.patients.values() for s in p.series.values()]
    assert len(series) == 1, scan.problems.lines()
    return series[0]


def assert_geometry(volume, written: WrittenSeries) -> None:
    """Each slice's (0, 0) voxel sits at its file's IPP; rows and columns step by PixelSpacing."""
    n = len(written.positions)
    np.testing.assert_allclose(
        volume.index_to_world(np.c_[np.arange(n), np.zeros(n), np.zeros(n)]), written.positions, atol=1e-6
    )
    row_dir, col_dir = written.orientation[:3], written.orientation[3:]
    expected = (
        written.positions[-1]
        + 3 * col_dir * written.pixel_spacing[0]
        + 5 * row_dir * written.pixel_spacing[1]
    )
    np.testing.assert_allclose(volume.index_to_world([n - 1, 3, 5]), expected, atol=1e-6)


@pytest.mark.parametrize("transfer_syntax", LOSSLESS, ids=lambda u: u.name)
def test_lossless_transfer_syntaxes_round_trip_exactly(site_dir: Path, transfer_syntax: uid.UID) -> None:
    size = 32 if transfer_syntax == uid.JPEG2000Lossless else 16  # openjpeg needs >= 32 px to encode
    written = write_series(site_dir / "study", transfer_syntax=transfer_syntax, rows=size, cols=size)
    assert pydicom.dcmread(written.paths[0]).file_meta.TransferSyntaxUID == transfer_syntax
    series = only_series(site_dir)
    assert series.transfer_syntax == transfer_syntax
    volume = load_volume(series)
    assert volume is not None
    assert volume.pixels.dtype == np.float32 and volume.pixels.shape == (5, size, size)
    np.testing.assert_array_equal(volume.pixels, written.expected)


def test_big_endian_file_is_encoded_big_endian(site_dir: Path) -> None:
    written = write_series(site_dir, transfer_syntax=uid.ExplicitVRBigEndian)
    ds = pydicom.dcmread(written.paths[0])
    assert ds.original_encoding == (False, False)  # (implicit VR, little endian)


def test_jpeg_baseline_round_trips_within_tolerance(site_dir: Path) -> None:
    written = write_series(site_dir, transfer_syntax=uid.JPEGBaseline8Bit)
    volume = load_volume(only_series(site_dir))
    assert volume is not None
    assert np.abs(volume.pixels - written.expected).max() <= 4


def test_supported_transfer_syntaxes_reports_installed_decoders() -> None:
    available = supported_transfer_syntaxes()
    for transfer_syntax in LOSSLESS + [uid.JPEGBaseline8Bit]:
        assert available[transfer_syntax.name] is True


def test_slices_ordered_by_position_not_instance_number(site_dir: Path) -> None:
    # write_series shuffles the files and numbers instances against position order.
    written = write_series(site_dir / "a" / "b", n_slices=6, shuffle=True, seed=3)
    instance_numbers = [int(pydicom.dcmread(p).InstanceNumber) for p in written.paths]
    assert instance_numbers != sorted(instance_numbers)
    series = only_series(site_dir)
    assert series.files == written.paths
    volume = load_volume(series)
    np.testing.assert_array_equal(volume.pixels, written.expected)


@pytest.mark.parametrize("orientation", ["AX", "COR", "SAG"])
def test_affine_matches_image_positions(site_dir: Path, orientation: str) -> None:
    written = write_series(site_dir, orientation=orientation, description="scan", pixel_spacing=(0.7, 1.1))
    series = only_series_any(site_dir)
    assert series.orientation == orientation
    volume = load_volume(series)
    assert volume.orientation == orientation
    assert_geometry(volume, written)
    np.testing.assert_allclose(volume.spacing, [3.0, 0.7, 1.1])


def only_series_any(site: Path) -> SeriesInfo:
    """The single series of ``site``, mapped or not."""
    scan = scan_site(site)
    found = [s for p in scan.patients.values() for s in [*p.series.values(), *p.unmapped]]
    assert len(found) == 1, scan.problems.lines()
    return found[0]


def test_rescale_applied_and_ct_gets_ct_key(site_dir: Path) -> None:
    written = write_series(
        site_dir, modality="CT", description="Pelvis 1.0", slope=0.5, intercept=-1024.0, orientation="AX"
    )
    series = only_series(site_dir)
    assert series.protocol == "CT"
    volume = load_volume(series)
    assert volume.modality == "CT" and volume.protocol == "CT"
    np.testing.assert_allclose(volume.pixels, written.stored * 0.5 - 1024.0)


def test_enhanced_multiframe_sorted_with_per_frame_rescale(site_dir: Path) -> None:
    written = write_enhanced_mr(site_dir / "enhanced.dcm")
    series = only_series(site_dir)
    assert series.protocol == "T2W_COR" and series.n_slices == 5 and series.files == written.paths
    volume = load_volume(series)
    np.testing.assert_allclose(volume.pixels, written.expected, rtol=1e-6)
    assert_geometry(volume, written)


def test_classic_multiframe_placed_by_spacing(site_dir: Path) -> None:
    written = write_classic_multiframe(site_dir / "mf")
    series = only_series(site_dir)
    assert series.protocol == "T1_AX" and series.n_slices == 4
    volume = load_volume(series)
    np.testing.assert_allclose(volume.pixels, written.expected)
    assert_geometry(volume, written)


def test_mixed_patients_in_one_folder_grouped_by_patient(site_dir: Path) -> None:
    write_series(site_dir, patient_id="A-1", description="T1 TSE COR", name_prefix="a")
    write_series(site_dir, patient_id="B-2", description="t2_tse_fs_tra", orientation="AX", name_prefix="b")
    write_series(site_dir, patient_id="A-1", description="PD FS SAG", orientation="SAG", name_prefix="c")
    scan = scan_site(site_dir)
    assert set(scan.patients) == {"A-1", "B-2"}
    assert set(scan.patients["A-1"].series) == {"T1_COR", "PDFS_SAG"}
    assert set(scan.patients["B-2"].series) == {"T2W_AX"}
    assert scan.protocol_counts()["T1_COR"] == 1
    assert not scan.problems


def test_unknown_series_noted_once_not_an_error(site_dir: Path) -> None:
    localiser = write_series(site_dir / "loc", description="3-plane loc", n_slices=3)
    ds = pydicom.dcmread(localiser.paths[0])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # localisers mix orientations: no warning
    ds.save_as(localiser.paths[0])
    write_series(site_dir / "dixon_f", description="t2_dixon_cor_F")
    write_series(site_dir / "dwi", description="ep2d_diff_tra_b800", orientation="AX")
    write_series(site_dir / "t1", description="T1 TSE COR")
    scan = scan_site(site_dir)
    patient = scan.patients["PAT-0001"]
    assert set(patient.series) == {"T1_COR"}
    assert len(patient.unmapped) == 2
    assert all(p.severity == "info" for p in scan.problems)
    notes = [p for p in scan.problems if "matches no protocol rule" in p.reason]
    assert {p.path.split("/")[0] for p in notes} == {"dixon_f", "dwi"}
    (ignored,) = [p for p in scan.problems if p.path.startswith("loc/")]
    assert "localiser" in ignored.reason


def test_corrupt_and_truncated_files_skipped_rest_loads(site_dir: Path) -> None:
    good = write_series(site_dir / "good")
    bad = write_series(site_dir / "bad", description="T1 TSE AX", orientation="AX", patient_id="PAT-0002")
    truncated_pixels = bad.paths[2]
    truncated_pixels.write_bytes(truncated_pixels.read_bytes()[:-100])
    truncated_header = bad.paths[4]
    truncated_header.write_bytes(truncated_header.read_bytes()[:150])
    garbage = site_dir / "bad" / "garbage"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)

    scan = scan_site(site_dir)
    paths = {p.path for p in scan.problems}
    assert "bad/" + truncated_pixels.name in paths
    assert "bad/" + truncated_header.name in paths
    assert "bad/garbage" in paths
    truncated = [p for p in scan.problems if p.path == "bad/" + truncated_pixels.name]
    assert "truncated" in truncated[0].reason
    volume = load_volume(scan.patients["PAT-0001"].series["T1_COR"])
    np.testing.assert_array_equal(volume.pixels, good.expected)
    for problem in scan.problems:
        assert "\n" not in str(problem)


def test_objects_without_pixel_data_skipped_with_reason(site_dir: Path) -> None:
    write_series(site_dir / "mr")
    write_structured_report(site_dir / "sr" / "report")
    no_pixels = write_series(site_dir / "nopix", description="T1 TSE AX", orientation="AX", n_slices=2)
    for path in no_pixels.paths:
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
    scan = scan_site(site_dir)
    assert set(scan.patients["PAT-0001"].series) == {"T1_COR"}
    sr = [p for p in scan.problems if p.path == "sr/report"]
    assert len(sr) == 1 and "not an image (Basic Text SR Storage" in sr[0].reason
    nopix = [p for p in scan.problems if p.path.startswith("nopix/")]
    assert len(nopix) == 1 and "2 files skipped: no pixel data" in nopix[0].reason
    assert scan.ignored == 3


@pytest.mark.parametrize("tag", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_tag_skips_series(site_dir: Path, tag: str) -> None:
    write_series(site_dir / "ok")
    broken = write_series(site_dir / "broken", description="T1 TSE AX", orientation="AX")
    ds = pydicom.dcmread(broken.paths[1])
    delattr(ds, tag)
    ds.save_as(broken.paths[1])
    scan = scan_site(site_dir)
    assert set(scan.patients["PAT-0001"].series) == {"T1_COR"}
    (problem,) = [p for p in scan.problems if tag in p.reason]
    assert problem.path == "broken/" + broken.paths[1].name
    assert "1 of 5 files; series skipped" in problem.reason


def test_gap_in_slices_skips_series(site_dir: Path) -> None:
    write_series(site_dir / "ok")
    write_series(site_dir / "gap", description="T1 TSE AX", orientation="AX", offsets_mm=[0, 3, 6, 12, 15])
    scan = scan_site(site_dir)
    assert set(scan.patients["PAT-0001"].series) == {"T1_COR"}
    (problem,) = [p for p in scan.problems if "gap" in p.reason]
    assert problem.path.startswith("gap/") and "6.00 mm" in problem.reason and "skipped" in problem.reason


def test_slightly_uneven_spacing_warns_and_loads(site_dir: Path) -> None:
    written = write_series(site_dir, offsets_mm=[0, 3, 6.4, 9, 12])
    log = ProblemLog()
    series = only_series(site_dir, log)
    (problem,) = [p for p in log if "spacing varies" in p.reason]
    assert problem.severity == "warning"
    volume = load_volume(series)
    np.testing.assert_array_equal(volume.pixels, written.expected)
    np.testing.assert_allclose(volume.index_to_world([4, 0, 0]), written.positions[-1], atol=1e-6)


def test_duplicate_positions_noted_and_dropped(site_dir: Path) -> None:
    write_series(site_dir, offsets_mm=[0, 3, 3, 6, 9])
    log = ProblemLog()
    series = only_series(site_dir, log)
    assert series.n_slices == 4
    assert any("duplicate slice positions" in p.reason for p in log)
    assert load_volume(series).pixels.shape == (4, 16, 16)


def test_mixed_orientation_and_sizes_skip_series(site_dir: Path) -> None:
    write_series(site_dir / "ok")
    mixed = write_series(site_dir / "mixed", description="T1 TSE AX", orientation="AX")
    ds = pydicom.dcmread(mixed.paths[0])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(mixed.paths[0])
    sizes = write_series(site_dir / "sizes", description="PD FS SAG", orientation="SAG")
    write_series(
        site_dir / "sizes",
        description="PD FS SAG",
        orientation="SAG",
        rows=12,
        n_slices=1,
        series_uid=sizes.series_uid,
        study_uid=sizes.study_uid,
        offsets_mm=[20.0],
        name_prefix="x",
    )
    scan = scan_site(site_dir)
    assert set(scan.patients["PAT-0001"].series) == {"T1_COR"}
    reasons = " | ".join(p.reason for p in scan.problems)
    assert "mixed orientations" in reasons and "different sizes (16x16, 12x16)" in reasons


def test_two_series_same_protocol_keep_most_slices(site_dir: Path) -> None:
    write_series(site_dir / "short", n_slices=3)
    longer = write_series(site_dir / "long", n_slices=6, description="t1_tse_cor")
    scan = scan_site(site_dir)
    assert scan.patients["PAT-0001"].series["T1_COR"].files == longer.paths
    assert any(p.path.startswith("short/") and "also maps to T1_COR" in p.reason for p in scan.problems)


def test_non_dicom_files_and_dicomdir_ignored_with_note(site_dir: Path) -> None:
    write_series(site_dir / "study")
    (site_dir / "README.txt").write_text("exported from PACS")
    (site_dir / "labels.csv").write_text("patient_id,side,arco_stage\n")
    dicomdir = site_dir / "DICOMDIR"
    ds = pydicom.dcmread(next((site_dir / "study").iterdir()))
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.save_as(dicomdir)
    scan = scan_site(site_dir)
    assert scan.n_files == 7 and scan.n_dicom == 5 and scan.ignored == 2
    notes = {p.path: p for p in scan.problems}
    assert set(notes) == {"README.txt", "DICOMDIR"}
    assert all(p.severity == "info" for p in notes.values())


def test_bad_protocols_toml_is_an_error_and_defaults_apply(site_dir: Path) -> None:
    write_series(site_dir / "study")
    (site_dir / "protocols.toml").write_text('[[rule]]\nkey = "T1_COR"\ndescription = "t1("\n')
    scan = scan_site(site_dir)
    (problem,) = scan.problems.errors
    assert problem.path == "protocols.toml" and "rule 1" in problem.reason
    assert "T1_COR" in scan.patients["PAT-0001"].series


def test_decode_failure_names_file_syntax_and_plugin(site_dir: Path) -> None:
    written = write_series(site_dir, transfer_syntax=uid.JPEGLSLossless)
    ds = pydicom.dcmread(written.paths[2])
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 40])
    ds.save_as(written.paths[2])
    log = ProblemLog()
    series = only_series(site_dir, log)
    assert load_volume(series, log) is None
    (problem,) = log.errors
    assert problem.path == written.paths[2].name
    assert "JPEG-LS Lossless" in problem.reason and "pyjpegls" in problem.reason


def test_decoder_hint_for_unknown_syntax() -> None:
    assert "no decoder" in decoder_hint("1.2.3.4.5")
    assert "natively" in decoder_hint(uid.ExplicitVRLittleEndian)


def test_source_files_unchanged_by_scan_and_load(site_dir: Path) -> None:
    write_series(site_dir / "a", transfer_syntax=uid.RLELossless)
    write_series(
        site_dir / "b", description="T1 TSE AX", orientation="AX", transfer_syntax=uid.ExplicitVRBigEndian
    )
    write_enhanced_mr(site_dir / "c" / "enhanced")
    write_structured_report(site_dir / "d" / "sr")
    (site_dir / "notes.txt").write_text("not dicom")
    shutil.copy(next((site_dir / "a").iterdir()), site_dir / "a" / "copy")

    def digests() -> dict[Path, str]:
        return {
            p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(site_dir.rglob("*")) if p.is_file()
        }

    before = digests()
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    scan = scan_site(site_dir)
    volumes = [load_volume(s, scan.problems) for p in scan.patients.values() for s in p.series.values()]
    assert len(volumes) == 3 and all(v is not None for v in volumes)
    assert digests() == before
    assert {p: p.stat().st_mtime_ns for p in before} == mtimes
