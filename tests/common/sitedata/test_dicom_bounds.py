"""Issue 14 item 4: DICOM resource bounds at the site (header, inflated size, image size) on hostile files."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from common.problems import ProblemLog
from common.sitedata.dicom import DEFAULT_LIMITS, DicomLimits, LimitExceeded, load_volume, scan_site
from common.sitedata.dicom.bounded import InflatedStream, inflated_exceeded
from tests.common.conftest import write_series

ROOT = Path(__file__).resolve().parents[3]
PIXEL_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
ZERO_BLOCK = 1 << 20
MAX_PEAK_MB = 200


# ----------------------------------------------------------------------------- hostile files


def _split_deflated(path: Path) -> tuple[bytes, bytes]:
    """A Deflated file's preamble and File Meta bytes, and its inflated dataset."""
    raw = path.read_bytes()
    meta_end = 132 + 12 + struct.unpack("<I", raw[140:144])[0]
    return raw[:meta_end], zlib.decompress(raw[meta_end:], -zlib.MAX_WBITS)


def _deflate_with_zeros(parts: list[bytes | int]) -> bytes:
    """Raw-deflate ``parts``: bytes as given, an int as that many zero bytes (cheaply, by repeated blocks)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [compressor.compress(b"") + compressor.flush(zlib.Z_FULL_FLUSH)]
    zero_block = compressor.compress(bytes(ZERO_BLOCK)) + compressor.flush(zlib.Z_FULL_FLUSH)
    for part in parts:
        if isinstance(part, bytes):
            out.append(compressor.compress(part) + compressor.flush(zlib.Z_FULL_FLUSH))
            continue
        blocks, rest = divmod(part, ZERO_BLOCK)
        out.append(zero_block * blocks)  # a full flush resets the state: every block is the same bytes
        out.append(compressor.compress(bytes(rest)) + compressor.flush(zlib.Z_FULL_FLUSH))
    out.append(compressor.flush(zlib.Z_FINISH))
    return b"".join(out)


def _element(group: int, element: int, vr: bytes, length: int) -> bytes:
    """An Explicit VR Little Endian element header with a 4-byte length (OB, OW, UN, SQ)."""
    return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<I", length)


def _good_deflated_slice(folder: Path) -> Path:
    written = write_series(
        folder, transfer_syntax=uid.DeflatedExplicitVRLittleEndian, n_slices=1, patient_id="BOMB"
    )
    return written.paths[0]


def write_pixel_bomb(path: Path, scratch: Path) -> int:
    """A Deflated 16x16 slice whose pixel data declares (and inflates to) 4.3 GB of zeros; its inflated size."""
    meta, dataset = _split_deflated(_good_deflated_slice(scratch))
    at = dataset.index(PIXEL_TAG)
    length = 0xFFFFFFF0
    path.write_bytes(
        meta + _deflate_with_zeros([dataset[:at] + _element(0x7FE0, 0x0010, b"OW", length), length])
    )
    return at + 12 + length


def write_header_bomb(path: Path, scratch: Path, elements: int = 256, each: int = 16 << 20) -> int:
    """A Deflated slice with ``elements`` private OB elements of ``each`` zero bytes before its pixel data."""
    meta, dataset = _split_deflated(_good_deflated_slice(scratch))
    at = dataset.index(PIXEL_TAG)
    creator = struct.pack("<HH", 0x7FD1, 0x0010) + b"LO" + struct.pack("<H", 4) + b"BOMB"
    parts: list[bytes | int] = [dataset[:at] + creator]
    for index in range(elements):
        parts += [_element(0x7FD1, 0x1000 + index, b"OB", each), each]
    parts.append(dataset[at:])
    path.write_bytes(meta + _deflate_with_zeros(parts))
    return elements * each


def write_huge_image_header(path: Path, scratch: Path) -> None:
    """A small uncompressed file whose header claims 65535 x 65535 x 1000 frames."""
    source = write_series(scratch, n_slices=1, patient_id="HUGE").paths[0]
    ds = pydicom.dcmread(source)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def good_site(site: Path) -> None:
    """Two good series of one patient beside which the hostile files are put."""
    write_series(site / "good" / "t1", description="T1 TSE COR", orientation="COR", patient_id="PAT-0001")
    write_series(site / "good" / "ax", description="T1 TSE AX", orientation="AX", patient_id="PAT-0001")


def good_series_loaded(site: Path, log: ProblemLog) -> None:
    """Both good series are found and decode."""
    scan = scan_site(site, log=log)
    series = scan.patients["PAT-0001"].series
    assert set(series) == {"T1_COR", "T1_AX"}, log.lines()
    assert all(load_volume(s, log) is not None for s in series.values()), log.lines()


def problem_of(log: ProblemLog, relpath: str):
    found = [p for p in log if p.path == relpath]
    assert len(found) == 1, log.lines()
    assert "\n" not in str(found[0])
    return found[0]


def peak_rss_delta_mb(site: Path) -> tuple[float, list[str]]:
    """Peak resident memory (MB) a fresh process adds while it scans ``site``; and the problem lines."""
    code = (
        "import json, resource, sys\n"
        "from pathlib import Path\n"
        "from common.sitedata.dicom import scan_site\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "scan = scan_site(Path(sys.argv[1]))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps([(after - before) / 1024, scan.problems.lines()]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    delta, lines = json.loads(result.stdout.strip().splitlines()[-1])
    return delta, lines


# ----------------------------------------------------------------------------- tests


def test_deflate_bomb_is_refused_and_the_site_loads(tmp_path):
    site = tmp_path / "site"
    good_site(site)
    (site / "bomb").mkdir()
    inflated = write_pixel_bomb(site / "bomb" / "pixels.dcm", tmp_path / "scratch1")
    write_header_bomb(site / "bomb" / "header.dcm", tmp_path / "scratch2")
    assert inflated > 4e9
    assert (site / "bomb" / "pixels.dcm").stat().st_size < 8e6  # a few MB on disk
    assert (site / "bomb" / "header.dcm").stat().st_size < 8e6

    started = time.perf_counter()
    delta_mb, lines = peak_rss_delta_mb(site)
    assert time.perf_counter() - started < 60
    assert delta_mb < MAX_PEAK_MB, (delta_mb, lines)

    log = ProblemLog()
    good_series_loaded(site, log)
    pixels = problem_of(log, "bomb/pixels.dcm")
    assert "Deflated data inflating to at least 4.3e9 bytes" in pixels.reason
    assert f"limit {2 * 1024**3 / 1e9:.1f}e9 bytes" in pixels.reason and "file skipped" in pixels.reason
    header = problem_of(log, "bomb/header.dcm")
    assert "header" in header.reason and "exceeds the limit 3.4e7 bytes" in header.reason
    assert pixels.fix and pixels.severity == "warning"


def test_deflate_bomb_inflation_is_bounded(tmp_path):
    path = tmp_path / "header.dcm"
    total = write_header_bomb(path, tmp_path / "scratch", elements=64, each=16 << 20)
    raw = path.read_bytes()
    meta_end = 132 + 12 + struct.unpack("<I", raw[140:144])[0]
    limit = 8 << 20
    tracemalloc.start()
    with path.open("rb") as fp:
        fp.seek(meta_end)
        stream = InflatedStream(fp, limit, inflated_exceeded(DicomLimits(max_inflated_bytes=limit)))
        with pytest.raises(LimitExceeded, match="exceeds the limit 8.4e6 bytes"):
            while stream.read(1 << 20):
                pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert total > 1e9 and stream.tell() <= limit
    assert peak < 3 * limit


def test_deflate_bomb_in_pixel_data_is_refused_when_decoding(tmp_path):
    site = tmp_path / "site"
    written = write_series(
        site / "t1", transfer_syntax=uid.DeflatedExplicitVRLittleEndian, patient_id="PAT-0001"
    )
    series = scan_site(site).patients["PAT-0001"].series["T1_COR"]
    write_pixel_bomb(written.paths[2], tmp_path / "scratch")  # replaced after the scan
    log = ProblemLog()
    tracemalloc.start()
    assert load_volume(series, log) is None
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6
    problem = problem_of(log, series.relpath(written.paths[2]))
    assert "Deflated data inflating to at least 4.3e9 bytes exceeds the limit" in problem.reason


def test_huge_image_header_is_refused_and_the_site_loads(tmp_path):
    site = tmp_path / "site"
    good_site(site)
    write_huge_image_header(site / "huge" / "IM0001", tmp_path / "scratch")
    log = ProblemLog()
    tracemalloc.start()
    good_series_loaded(site, log)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100e6
    problem = problem_of(log, "huge/IM0001")
    assert problem.reason == (
        "rows 65535 x columns 65535 x 1000 frames = 4.3e12 voxels exceeds the limit 5.0e8 voxels: "
        "not a clinical MR/CT image, file skipped"
    )


def test_huge_image_header_is_refused_when_decoding(tmp_path):
    site = tmp_path / "site"
    written = write_series(site / "t1", patient_id="PAT-0001")
    series = scan_site(site).patients["PAT-0001"].series["T1_COR"]
    write_huge_image_header(written.paths[1], tmp_path / "scratch")  # replaced after the scan
    log = ProblemLog()
    tracemalloc.start()
    assert load_volume(series, log) is None
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6
    assert "4.3e12 voxels exceeds the limit 5.0e8" in problem_of(log, series.relpath(written.paths[1])).reason


def test_oversized_header_is_refused_and_the_site_loads(tmp_path):
    site = tmp_path / "site"
    good_site(site)
    scratch = write_series(tmp_path / "scratch", n_slices=2, patient_id="BIG").paths
    big_tag = pydicom.dcmread(scratch[0])
    big_tag.private_block(0x0029, "HOSTILE", create=True).add_new(
        0x10, "OB", bytes(DEFAULT_LIMITS.max_header_bytes)
    )
    (site / "big").mkdir()
    big_tag.save_as(site / "big" / "private.dcm", enforce_file_format=True)
    claimed = bytearray((site / "big" / "private.dcm").read_bytes())
    at = claimed.index(b"\x29\x00\x10\x10OB")
    claimed[at + 8 : at + 12] = struct.pack("<I", 0xFFFFFFF0)  # claims 4.3 GB, holds 32 MiB
    (site / "big" / "claimed.dcm").write_bytes(bytes(claimed))
    long_sequence = pydicom.dcmread(scratch[1])
    item = Dataset()
    item.CodeMeaning = "x" * 60
    long_sequence.ReferencedImageSequence = Sequence([item] * 20_000)  # ~1.5 MB before the pixel data
    long_sequence.save_as(site / "big" / "sequence.dcm", enforce_file_format=True)

    log = ProblemLog()
    good_series_loaded(site, log)
    for name in ("private.dcm", "claimed.dcm"):
        problem = problem_of(log, f"big/{name}")
        assert problem.reason.startswith("header (the data before the pixel data) of at least"), problem
        assert "exceeds the limit 3.4e7 bytes" in problem.reason
    assert not [p for p in log if p.path == "big/sequence.dcm" and "limit" in p.reason]  # under the default

    small = DicomLimits(max_header_bytes=1 << 20)
    log = ProblemLog()
    scan = scan_site(site, log=log, limits=small)
    assert set(scan.patients["PAT-0001"].series) == {"T1_COR", "T1_AX"}
    assert "exceeds the limit 1.0e6 bytes" in problem_of(log, "big/sequence.dcm").reason


def test_limits_are_documented_with_their_values():
    text = (ROOT / "docs" / "site-data.md").read_text()
    for name, value in vars(DEFAULT_LIMITS).items():
        assert f"`{name}`" in text, name
        assert isinstance(value, int) and value > 0


def test_series_over_the_voxel_limit_is_refused(tmp_path):
    site = tmp_path / "site"
    good_site(site)
    log = ProblemLog()
    scan = scan_site(site, log=log, limits=DicomLimits(max_voxels_per_series=16 * 16 * 4))
    assert scan.patients == {}
    refused = [p for p in log if "voxels exceeds the limit 1024 voxels" in p.reason]
    assert len(refused) == 2 and all("series skipped" in p.reason for p in refused)
