"""Fixtures that write tiny DICOM series (any orientation, transfer syntax, multi-frame) to tmp_path."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    MRImageStorage,
    generate_uid,
)

# Row and column direction cosines per orientation (slice normal = row x column).
ORIENTATION_COSINES: dict[str, tuple[float, ...]] = {
    "AX": (1, 0, 0, 0, 1, 0),  # normal +z
    "COR": (1, 0, 0, 0, 0, -1),  # normal +y
    "SAG": (0, 1, 0, 0, 0, -1),  # normal -x
}
NATIVE_SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)


@dataclass
class WrittenSeries:
    """What :func:`write_series` wrote, in slice order along the slice normal.

    Attributes:
        paths: one file per slice (one file in all for multi-frame), in position order.
        stored: stored pixel values ``(S, R, C)`` in position order, before rescale.
        positions: ImagePositionPatient per slice ``(S, 3)``.
        orientation: ImageOrientationPatient ``(6,)``.
        pixel_spacing: ``(row spacing, column spacing)`` mm.
        slope, intercept: rescale per slice ``(S,)``.
    """

    paths: list[Path]
    stored: np.ndarray
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slope: np.ndarray
    intercept: np.ndarray
    series_uid: str
    patient_id: str
    study_uid: str

    @property
    def expected(self) -> np.ndarray:
        """Rescaled values ``(S, R, C)`` float32, as ``load_volume`` should give them."""
        return (self.stored * self.slope[:, None, None] + self.intercept[:, None, None]).astype(np.float32)


def _base_dataset(
    sop_class: str, modality: str, rows: int, cols: int, patient_id: str, study_uid: str, series_uid: str
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Test^Patient"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def _encode_jpeg_lossless_sv1(image: np.ndarray, precision: int = 16) -> bytes:
    """A minimal JPEG Lossless (process 14, selection value 1) encoder for one grayscale frame.

    One fixed Huffman table gives each difference category 0-16 a 5-bit code; prediction is
    the left neighbour (the row above in the first column), as the standard defines.
    """
    rows, cols = image.shape
    out = bytearray(b"\xff\xd8")
    out += b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([precision])
    out += rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5
    table = bytes([0x00]) + bytes(counts) + bytes(range(17))
    out += b"\xff\xc4" + (2 + len(table)).to_bytes(2, "big") + table
    out += b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0x00, 1, 0, 0])
    bits: list[str] = []
    values = image.astype(np.int64)
    for r in range(rows):
        for c in range(cols):
            if r == 0 and c == 0:
                prediction = 1 << (precision - 1)
            elif r == 0:
                prediction = values[r, c - 1]
            elif c == 0:
                prediction = values[r - 1, c]
            else:
                prediction = values[r, c - 1]
            diff = int(values[r, c] - prediction) & 0xFFFF
            diff = diff - 0x10000 if diff > 0x8000 else diff
            category = 16 if diff == 0x8000 else abs(diff).bit_length()
            bits.append(format(category, "05b"))
            if 0 < category < 16:
                extra = diff if diff > 0 else diff - 1
                bits.append(format(extra & ((1 << category) - 1), f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        out.append(byte)
        if byte == 0xFF:
            out.append(0x00)  # byte stuffing
    return bytes(out + b"\xff\xd9")


def _encode_jpeg_baseline(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _set_pixels(ds: Dataset, frames: np.ndarray, transfer_syntax: str) -> None:
    """Store ``frames`` ``(F, R, C)`` in ``ds`` encoded with ``transfer_syntax``."""
    if transfer_syntax == JPEGBaseline8Bit:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([_encode_jpeg_baseline(f) for f in frames])
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        return
    if transfer_syntax == JPEGLosslessSV1:
        ds.PixelData = encapsulate([_encode_jpeg_lossless_sv1(f) for f in frames])
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        return
    data = frames.astype(np.uint16)
    if transfer_syntax in NATIVE_SYNTAXES:
        # pydicom writes OW bytes as given: big endian needs big-endian pixel bytes.
        dtype = ">u2" if transfer_syntax == ExplicitVRBigEndian else "<u2"
        ds.PixelData = data.astype(dtype).tobytes()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        return
    ds.PixelData = data.tobytes()
    ds.compress(transfer_syntax, data if len(frames) > 1 else data[0], generate_instance_uid=False)


def _test_image(rng: np.random.Generator, rows: int, cols: int, eight_bit: bool) -> np.ndarray:
    if eight_bit:  # smooth, so lossy JPEG stays close
        y, x = np.mgrid[0:rows, 0:cols]
        return (40 + 8 * x + 5 * y + rng.integers(0, 20)).clip(0, 255).astype(np.uint16)
    return rng.integers(0, 4000, (rows, cols)).astype(np.uint16)


def write_series(
    folder: Path,
    *,
    description: str = "T1 TSE COR",
    orientation: str = "COR",
    n_slices: int = 5,
    rows: int = 16,
    cols: int = 16,
    patient_id: str = "PAT-0001",
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "MR",
    transfer_syntax: str = ExplicitVRLittleEndian,
    slice_spacing: float = 3.0,
    offsets_mm: list[float] | None = None,
    pixel_spacing: tuple[float, float] = (0.75, 0.8),
    origin: tuple[float, float, float] = (-60.0, 10.0, 40.0),
    slope: float = 1.0,
    intercept: float = 0.0,
    shuffle: bool = True,
    seed: int = 0,
    name_prefix: str = "",
) -> WrittenSeries:
    """Write a single-frame series, one file per slice, files named without extension.

    Files are written in shuffled order with InstanceNumbers that do not follow position, so
    readers must sort by ImagePositionPatient. ``offsets_mm`` (along the slice normal) overrides
    regular spacing.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    cosines = np.asarray(ORIENTATION_COSINES[orientation], dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    offsets = np.asarray(offsets_mm if offsets_mm is not None else np.arange(n_slices) * slice_spacing, float)
    positions = np.asarray(origin) + offsets[:, None] * normal
    eight_bit = transfer_syntax == JPEGBaseline8Bit
    stored = np.stack([_test_image(rng, rows, cols, eight_bit) for _ in offsets])
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    write_order = rng.permutation(len(offsets)) if shuffle else np.arange(len(offsets))
    paths: list[Path | None] = [None] * len(offsets)
    for file_index, slice_index in enumerate(write_order):
        ds = _base_dataset(sop_class, modality, rows, cols, patient_id, study_uid, series_uid)
        ds.SeriesDescription = description
        ds.InstanceNumber = int(len(offsets) - file_index)  # deliberately unrelated to position
        ds.ImagePositionPatient = [float(v) for v in positions[slice_index]]
        ds.ImageOrientationPatient = [float(v) for v in cosines]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = float(slice_spacing)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        _set_pixels(ds, stored[slice_index][None], transfer_syntax)
        path = folder / f"{name_prefix}IM{file_index:04d}"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths[slice_index] = path
    n = len(offsets)
    return WrittenSeries(
        paths=[p for p in paths if p is not None],
        stored=stored.astype(np.float64),
        positions=positions,
        orientation=cosines,
        pixel_spacing=pixel_spacing,
        slope=np.full(n, slope),
        intercept=np.full(n, intercept),
        series_uid=series_uid,
        patient_id=patient_id,
        study_uid=study_uid,
    )


def write_enhanced_mr(
    path: Path,
    *,
    description: str = "T2 DIXON W COR",
    orientation: str = "COR",
    n_frames: int = 5,
    rows: int = 16,
    cols: int = 16,
    patient_id: str = "PAT-0001",
    slice_spacing: float = 4.0,
    pixel_spacing: tuple[float, float] = (0.9, 0.7),
    origin: tuple[float, float, float] = (-50.0, -20.0, 30.0),
    seed: int = 1,
) -> WrittenSeries:
    """Write one Enhanced MR file: frames stored in shuffled position order, geometry in the
    functional groups, and a different RescaleSlope/Intercept per frame."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cosines = np.asarray(ORIENTATION_COSINES[orientation], dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    positions = np.asarray(origin) + (np.arange(n_frames) * slice_spacing)[:, None] * normal
    stored = np.stack([_test_image(rng, rows, cols, False) for _ in range(n_frames)])
    slopes = 0.5 + 0.25 * np.arange(n_frames)
    intercepts = -10.0 * np.arange(n_frames)
    order = rng.permutation(n_frames)  # frame k of the file holds slice order[k]

    ds = _base_dataset(EnhancedMRImageStorage, "MR", rows, cols, patient_id, generate_uid(), generate_uid())
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n_frames
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [float(v) for v in pixel_spacing]
    measures.SliceThickness = slice_spacing
    shared.PixelMeasuresSequence = Sequence([measures])
    plane = Dataset()
    plane.ImageOrientationPatient = [float(v) for v in cosines]
    shared.PlaneOrientationSequence = Sequence([plane])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for slice_index in order:
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [float(v) for v in positions[slice_index]]
        item.PlanePositionSequence = Sequence([position])
        transform = Dataset()
        transform.RescaleSlope = float(slopes[slice_index])
        transform.RescaleIntercept = float(intercepts[slice_index])
        transform.RescaleType = "US"
        item.PixelValueTransformationSequence = Sequence([transform])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    _set_pixels(ds, stored[order], ExplicitVRLittleEndian)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return WrittenSeries(
        paths=[path],
        stored=stored.astype(np.float64),
        positions=positions,
        orientation=cosines,
        pixel_spacing=pixel_spacing,
        slope=slopes,
        intercept=intercepts,
        series_uid=str(ds.SeriesInstanceUID),
        patient_id=patient_id,
        study_uid=str(ds.StudyInstanceUID),
    )


def write_classic_multiframe(
    path: Path,
    *,
    description: str = "T1 TSE AX",
    orientation: str = "AX",
    n_frames: int = 4,
    rows: int = 16,
    cols: int = 16,
    patient_id: str = "PAT-0001",
    slice_spacing: float = 2.5,
    seed: int = 2,
) -> WrittenSeries:
    """Write one classic MR file with NumberOfFrames > 1 placed by SpacingBetweenSlices."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cosines = np.asarray(ORIENTATION_COSINES[orientation], dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    origin = np.array([-40.0, -30.0, 20.0])
    positions = origin + (np.arange(n_frames) * slice_spacing)[:, None] * normal
    stored = np.stack([_test_image(rng, rows, cols, False) for _ in range(n_frames)])
    ds = _base_dataset(MRImageStorage, "MR", rows, cols, patient_id, generate_uid(), generate_uid())
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n_frames
    ds.ImagePositionPatient = [float(v) for v in origin]
    ds.ImageOrientationPatient = [float(v) for v in cosines]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SpacingBetweenSlices = slice_spacing
    ds.RescaleSlope, ds.RescaleIntercept = 2.0, 5.0
    _set_pixels(ds, stored, ExplicitVRLittleEndian)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return WrittenSeries(
        paths=[path],
        stored=stored.astype(np.float64),
        positions=positions,
        orientation=cosines,
        pixel_spacing=(0.8, 0.8),
        slope=np.full(n_frames, 2.0),
        intercept=np.full(n_frames, 5.0),
        series_uid=str(ds.SeriesInstanceUID),
        patient_id=patient_id,
        study_uid=str(ds.StudyInstanceUID),
    )


def write_structured_report(path: Path, patient_id: str = "PAT-0001") -> Path:
    """Write a Basic Text SR object (no pixel data), as PACS exports often include."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sr_class = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sr_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sr_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesDescription = "Radiology report"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


@pytest.fixture
def dicom_writers():
    """The writers of this module, for test files elsewhere that reuse them."""
    return {
        "series": write_series,
        "enhanced_mr": write_enhanced_mr,
        "classic_multiframe": write_classic_multiframe,
        "structured_report": write_structured_report,
    }


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    """An empty site folder under tmp_path."""
    path = tmp_path / "site"
    path.mkdir()
    return path
