"""Reading one DICOM file's header (never its pixels) and deciding whether it is a usable image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from common.problems import ProblemLog, first_line
from common.sitedata.dicom.bounded import BoundedRead, inflated_exceeded, read_bounded
from common.sitedata.dicom.geometry import FrameGeometry, GeometryError, frame_geometry, slice_step_tag
from common.sitedata.dicom.limits import DEFAULT_LIMITS, DicomLimits, LimitExceeded, check_image
from common.sitedata.dicom.model import relative

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
MODALITIES = ("MR", "CT")
UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass
class Header:
    """What scanning keeps of one DICOM file."""

    path: Path
    series_uid: str
    patient_id: str
    study_uid: str
    modality: str
    description: str
    transfer_syntax: str
    rows: int
    cols: int
    samples: int
    instance: int
    frames: list[FrameGeometry] = field(default_factory=list)
    thickness: float | None = None
    geometry_error: GeometryError | None = None


def read_header(
    path: Path,
    site_dir: Path,
    problems: ProblemLog,
    skipped: dict[tuple[str, str], list[Path]],
    limits: DicomLimits = DEFAULT_LIMITS,
) -> Header | None:
    """Read one file's header (never its pixels); None when it is not a usable image instance.

    Files that are DICOM but not an MR/CT image are collected in ``skipped`` by (series, reason),
    so that a series of them makes one problem line; anything else wrong is a problem of its own,
    a file over ``limits`` too (refused before anything past the limit is read).
    """
    where = relative(path, site_dir)
    partial = _read_partial(path, where, problems, limits)
    if partial is None:
        return None
    ds, meta = partial.ds, partial.ds.file_meta
    if str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS or path.name.upper() == "DICOMDIR":
        problems.add(
            where,
            "DICOMDIR index file; ignored (series are found by walking the folder)",
            "nothing to do",
            "info",
        )
        return None
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not series_uid or "SOPClassUID" not in ds:
        missing = " and ".join(k for k in ("SOPClassUID", "SeriesInstanceUID") if k not in ds)
        problems.add(
            where,
            f"incomplete DICOM header (no {missing}): file corrupt or truncated; skipped",
            "re-export this file from PACS",
        )
        return None
    transfer_syntax = str(meta.get("TransferSyntaxUID", "") or pydicom.uid.ImplicitVRLittleEndian)
    reason = _not_used_because(ds, partial.pixel_length)
    if reason is not None:
        skipped[(series_uid, reason)].append(path)
        return None
    if _over_limits(partial, where, problems, limits) or _truncated(
        partial, transfer_syntax, where, problems
    ):
        return None
    return _header(ds, path, series_uid, transfer_syntax)


def _read_partial(path: Path, where: str, problems: ProblemLog, limits: DicomLimits) -> BoundedRead | None:
    """The header up to the pixel data, within ``limits``; None (with a problem) when unreadable or too large."""
    try:
        return read_bounded(path, limits)
    except InvalidDicomError:
        problems.add(where, "not a DICOM file (no DICM preamble); ignored", "nothing to do", "info")
    except LimitExceeded as exc:
        problems.add(where, exc.reason, exc.fix)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is reported, never raised
        problems.add(
            where,
            f"unreadable DICOM header ({type(exc).__name__}: {first_line(exc)}); file corrupt or truncated, skipped",
            "re-export this file from PACS",
        )
    return None


def _over_limits(partial: BoundedRead, where: str, problems: ProblemLog, limits: DicomLimits) -> bool:
    """True (with a problem) when the image the header describes, or its inflated size, is over ``limits``."""
    try:
        check_image(partial.ds, limits)
        length = partial.pixel_length[0]
        reach = partial.after_header + length
        if partial.deflated and length != UNDEFINED_LENGTH and reach > limits.max_inflated_bytes:
            raise inflated_exceeded(limits)(reach)
    except LimitExceeded as exc:
        problems.add(where, exc.reason, exc.fix)
        return True
    return False


def _not_used_because(ds: Dataset, pixel_length: list[int]) -> str | None:
    """Why a DICOM object is not an MR/CT image this project uses, or None when it is one."""
    sop_class = UID(str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "")))
    modality = str(ds.get("Modality", "") or "")
    if not sop_class.name.endswith("Image Storage"):
        return f"not an image ({sop_class.name or 'unknown SOP class'}, Modality {modality or '?'})"
    if not pixel_length:
        return f"no pixel data ({sop_class.name}); file may be truncated"
    if modality not in MODALITIES:
        return f"modality {modality or '?'} is not used (only MR and CT)"
    return None


def _truncated(partial: BoundedRead, transfer_syntax: str, where: str, problems: ProblemLog) -> bool:
    """True (with a problem) when the file is shorter than its pixel data element says."""
    syntax = UID(transfer_syntax)
    length = partial.pixel_length[0]
    # A deflated file's offsets are in the inflated stream; undefined lengths are encapsulated.
    if not syntax.is_transfer_syntax or syntax.is_deflated or length == UNDEFINED_LENGTH:
        return False
    header_bytes = 8 if syntax.is_implicit_VR else 12
    if partial.after_header + header_bytes + length <= partial.size:
        return False
    problems.add(
        where,
        f"file truncated: pixel data needs {length} bytes, only "
        f"{max(partial.size - partial.after_header - header_bytes, 0)} present; skipped",
        "re-export this file from PACS",
    )
    return True


def _header(ds: Dataset, path: Path, series_uid: str, transfer_syntax: str) -> Header:
    """The :class:`Header` of a usable image file, with its frames' geometry (or why it has none)."""
    header = Header(
        path=path,
        series_uid=series_uid,
        patient_id=str(ds.get("PatientID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        description=str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or "").strip(),
        transfer_syntax=transfer_syntax,
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        instance=int(ds.get("InstanceNumber", 0) or 0),
        thickness=slice_step_tag(ds),
    )
    try:
        header.frames = frame_geometry(ds, path)
    except GeometryError as exc:
        header.geometry_error = exc
    return header
