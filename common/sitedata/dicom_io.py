"""DICOM ingestion: find series in a site folder (headers only), map them to protocols, load volumes."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from common.problems import ProblemLog
from common.sitedata.protocols import ProtocolRules, ProtocolRulesError
from common.sitedata.volume import Volume, affine_from_dicom

# Files of the site folder convention that are not DICOM and need no note.
SITE_FILES: frozenset[str] = frozenset({"labels.csv", "protocols.toml"})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # PixelData, Double/Float PixelData
MODALITIES = ("MR", "CT")

# Transfer syntaxes reported by ``supported_transfer_syntaxes`` (the ones PACS exports use).
REPORTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
    pydicom.uid.RLELossless,
    pydicom.uid.JPEGBaseline8Bit,
    pydicom.uid.JPEGExtended12Bit,
    pydicom.uid.JPEGLossless,
    pydicom.uid.JPEGLosslessSV1,
    pydicom.uid.JPEGLSLossless,
    pydicom.uid.JPEGLSNearLossless,
    pydicom.uid.JPEG2000Lossless,
    pydicom.uid.JPEG2000,
    pydicom.uid.HTJ2KLossless,
    pydicom.uid.HTJ2K,
)

# Decoder plugin tried first per transfer syntax when installed (pydicom's default order is
# used otherwise, and as the fallback): pyjpegls decodes JPEG-LS about 4x faster than pylibjpeg.
PREFERRED_PLUGINS: dict[str, str] = {
    pydicom.uid.JPEGLSLossless: "pyjpegls",
    pydicom.uid.JPEGLSNearLossless: "pyjpegls",
}

POSITION_TOLERANCE_MM = 0.01  # two slices closer than this are at the same position
ORIENTATION_TOLERANCE = 1e-3  # direction cosines that differ less are the same orientation
GAP_FACTOR = 1.5  # a step larger than this times the smallest step means missing slices


@dataclass(frozen=True)
class FrameRef:
    """One 2D image of a series: a file (and a frame of it, for multi-frame files) and its place.

    Attributes:
        path: absolute path of the file.
        frame: index of the frame in a multi-frame file, or None for a single-frame file.
        position: ImagePositionPatient of the frame, LPS mm ``(3,)``.
        slope, intercept: RescaleSlope / RescaleIntercept of this frame.
    """

    path: Path
    frame: int | None
    position: tuple[float, float, float]
    slope: float = 1.0
    intercept: float = 0.0


@dataclass
class SeriesInfo:
    """A series found by :func:`scan_site`, with everything needed to load it.

    ``files`` are sorted by slice position along the slice normal; ``frames`` hold one entry
    per slice in the same order, and ``affine`` maps ``(s, r, c, 1)`` to LPS mm.
    """

    series_uid: str
    patient_id: str
    study_uid: str
    modality: str
    description: str
    orientation: str
    protocol: str | None
    files: list[Path]
    n_slices: int
    transfer_syntax: str
    rows: int
    cols: int
    frames: list[FrameRef] = field(default_factory=list, repr=False)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4), repr=False)
    site_dir: Path | None = field(default=None, repr=False)

    @property
    def transfer_syntax_name(self) -> str:
        return UID(self.transfer_syntax).name

    def relpath(self, path: Path | None = None) -> str:
        """``path`` (default: the first file) relative to the site folder, for problems."""
        return _relative(path or self.files[0], self.site_dir)


@dataclass
class PatientScan:
    """The usable series of one patient.

    Attributes:
        series: protocol key (``"T1_COR"``, ..., ``"CT"``) -> the series used for it.
        unmapped: MR series that match no protocol rule (not an error).
        study_uids: StudyInstanceUIDs seen for this patient (MR and CT are often separate).
    """

    patient_id: str
    series: dict[str, SeriesInfo] = field(default_factory=dict)
    unmapped: list[SeriesInfo] = field(default_factory=list)
    study_uids: set[str] = field(default_factory=set)

    @property
    def has_ct(self) -> bool:
        return "CT" in self.series

    def protocols(self) -> list[str]:
        """Protocol keys present (MR only, without ``"CT"``)."""
        return [key for key in self.series if key != "CT"]


@dataclass
class SiteScan:
    """Everything :func:`scan_site` found in a site folder.

    Attributes:
        patients: PatientID -> the patient's series.
        n_files: files walked (excluding labels.csv and protocols.toml).
        n_dicom: files that were readable DICOM.
        ignored: files not used (not DICOM, DICOMDIR, non-image, unreadable, skipped series).
    """

    site_dir: Path
    patients: dict[str, PatientScan] = field(default_factory=dict)
    problems: ProblemLog = field(default_factory=ProblemLog)
    n_files: int = 0
    n_dicom: int = 0
    ignored: int = 0
    rules: ProtocolRules | None = None

    def protocol_counts(self) -> dict[str, int]:
        """Number of patients having each protocol key (rule keys first, then ``"CT"``)."""
        keys = list(self.rules.keys if self.rules else ()) + ["CT"]
        counts = Counter(key for p in self.patients.values() for key in p.series)
        keys += sorted(k for k in counts if k not in keys)
        return {key: counts.get(key, 0) for key in keys}

    def n_series(self) -> int:
        """Series in use (mapped to a protocol key or CT)."""
        return sum(len(p.series) for p in self.patients.values())

    def summary(self) -> str:
        """A few lines: files, patients, patients per protocol, problems per severity."""
        counts = self.problems.counts()
        per_protocol = ", ".join(f"{k} {v}" for k, v in self.protocol_counts().items())
        return "\n".join(
            [
                f"{self.site_dir}: {self.n_files} files, {self.n_dicom} DICOM, {self.ignored} not used",
                f"{len(self.patients)} patients, {self.n_series()} series in use",
                f"patients per protocol: {per_protocol}",
                f"problems: {counts['error']} errors, {counts['warning']} warnings, {counts['info']} notes",
            ]
        )


class _GeometryError(Exception):
    """A frame lacks a geometry tag; ``tag`` names it."""

    def __init__(self, tag: str, detail: str = "") -> None:
        super().__init__(tag)
        self.tag = tag
        self.detail = detail


@dataclass
class _Header:
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
    orientation: np.ndarray | None = None
    spacing: tuple[float, float] | None = None
    frames: list[tuple[FrameRef, np.ndarray, tuple[float, float]]] = field(default_factory=list)
    thickness: float | None = None
    geometry_error: _GeometryError | None = None


def supported_transfer_syntaxes() -> dict[str, bool]:
    """Transfer syntax name -> whether an installed pydicom decoder plugin can decode it now."""
    available = {}
    for uid in REPORTED_TRANSFER_SYNTAXES:
        try:
            available[uid.name] = bool(get_decoder(uid).is_available)
        except NotImplementedError:
            available[uid.name] = False
    return available


def decoder_hint(transfer_syntax: str) -> str:
    """One sentence on which plugin decodes ``transfer_syntax`` and whether it is installed."""
    uid = UID(transfer_syntax)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"pydicom has no decoder for {uid.name} ({uid})"
    if not uid.is_compressed:
        return "pydicom decodes it natively"
    if decoder.is_available:
        return f"decoder plugins installed: {', '.join(decoder.available_plugins)}"
    missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
    return f"no decoder plugin installed for {uid.name}; install one of: {missing}"


def scan_site(site_dir: Path, rules: ProtocolRules | None = None, log: ProblemLog | None = None) -> SiteScan:
    """Find every usable MR/CT series below ``site_dir`` from headers alone.

    Walks all files (any depth, any names), reads headers (pixel data is not read), groups
    instances into series by SeriesInstanceUID and series into patients by PatientID, checks
    each series' geometry and maps it to a protocol key. Nothing raises for bad input: each
    problem becomes one line in ``scan.problems`` (also appended to ``log`` when given).

    Args:
        site_dir: the site's data folder.
        rules: protocol rules; None reads ``site_dir/protocols.toml`` if present, else defaults.
        log: optional shared problem log.

    Returns:
        The :class:`SiteScan`; source files are opened read-only and never modified.
    """
    site_dir = Path(site_dir)
    problems = log if log is not None else ProblemLog()
    if rules is None:
        rules = _site_rules(site_dir, problems)
    scan = SiteScan(site_dir=site_dir, problems=problems, rules=rules)

    headers: dict[str, list[_Header]] = defaultdict(list)
    skipped: dict[tuple[str, str], list[Path]] = defaultdict(list)  # (series, reason) -> files
    for path in _walk(site_dir):
        scan.n_files += 1
        header = _read_header(path, site_dir, problems, skipped)
        if header is None:
            scan.ignored += 1
            continue
        scan.n_dicom += 1
        headers[header.series_uid].append(header)

    for (_, reason), paths in skipped.items():
        count = f"{len(paths)} files" if len(paths) > 1 else "file"
        problems.add(
            _relative(paths[0], site_dir),
            f"{count} skipped: {reason}",
            "nothing to do if this object is not an MR/CT image; otherwise re-export it as an image",
            "info",
        )

    for series_headers in headers.values():
        series = _build_series(series_headers, site_dir, rules, problems)
        if series is None:
            scan.ignored += len(series_headers)
            continue
        patient = scan.patients.setdefault(series.patient_id, PatientScan(series.patient_id))
        patient.study_uids.add(series.study_uid)
        if series.protocol is None:
            patient.unmapped.append(series)
            problems.add(
                series.relpath(),
                f"series '{series.description}' ({series.modality}, {series.orientation}, "
                f"{series.n_slices} slices) matches no protocol rule; not used",
                "nothing to do unless it should be used: then add a rule to protocols.toml",
                "info",
            )
            continue
        _keep_largest(patient, series, problems)
    scan.patients = dict(sorted(scan.patients.items()))
    return scan


def load_volume(series: SeriesInfo, log: ProblemLog | None = None) -> Volume | None:
    """Decode a scanned series into a float32 :class:`Volume` ``(S, R, C)`` with its LPS affine.

    Slices are in the order of their position along the slice normal (found by
    :func:`scan_site`, not from InstanceNumber); RescaleSlope/Intercept are applied per frame.

    Returns:
        The volume, or None when a file cannot be decoded (a problem naming the file, the
        transfer syntax and the decoder plugin is added to ``log``).
    """
    log = log if log is not None else ProblemLog()
    pixels = np.empty((len(series.frames), series.rows, series.cols), dtype=np.float32)
    by_file: dict[Path, list[int]] = defaultdict(list)
    for index, frame in enumerate(series.frames):
        by_file[frame.path].append(index)
    for path, indices in by_file.items():
        where = series.relpath(path)
        try:
            ds = pydicom.dcmread(path, force=False)
            ts = str(ds.file_meta.get("TransferSyntaxUID", series.transfer_syntax))
        except Exception as exc:  # noqa: BLE001 - any read failure is reported, never raised
            log.add(
                where, f"cannot read file ({type(exc).__name__}: {_first_line(exc)})", "re-export the series"
            )
            return None
        try:
            array = _decode(ds, ts)
        except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
            log.add(
                where,
                f"cannot decode pixel data in {UID(ts).name} ({_first_line(exc)}); {decoder_hint(ts)}",
                "install the decoder plugin named, or re-export the series as Explicit VR Little Endian",
                "error",
            )
            return None
        n_frames = int(ds.get("NumberOfFrames") or 1)
        array = array.reshape(n_frames, *array.shape[-2:]) if array.ndim >= 2 else array
        if array.shape[-2:] != (series.rows, series.cols):
            log.add(
                where,
                f"decoded image is {array.shape[-2]}x{array.shape[-1]}, header says {series.rows}x{series.cols}",
                "re-export the series",
                "error",
            )
            return None
        for index in indices:
            frame = series.frames[index]
            image = array[frame.frame or 0].astype(np.float32)
            pixels[index] = image * np.float32(frame.slope) + np.float32(frame.intercept)
    return Volume(
        pixels=pixels, affine=series.affine.copy(), modality=series.modality, protocol=series.protocol
    )


def _decode(ds: Dataset, transfer_syntax: str) -> np.ndarray:
    """The file's pixel array, with the fastest installed plugin for its transfer syntax first."""
    plugin = PREFERRED_PLUGINS.get(transfer_syntax)
    if plugin is not None and plugin in _available_plugins(transfer_syntax):
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return ds.pixel_array
        except Exception:  # noqa: BLE001 - the other plugins still get their chance below
            ds.pixel_array_options()
    return ds.pixel_array


def _available_plugins(transfer_syntax: str) -> tuple[str, ...]:
    try:
        return tuple(get_decoder(UID(transfer_syntax)).available_plugins)
    except NotImplementedError:
        return ()


def _site_rules(site_dir: Path, problems: ProblemLog) -> ProtocolRules:
    """The site's protocols.toml if present and valid; a bad file is an error and defaults are used."""
    path = site_dir / "protocols.toml"
    if not path.is_file():
        return ProtocolRules.default()
    try:
        return ProtocolRules.from_toml(path)
    except ProtocolRulesError as exc:
        problems.add("protocols.toml", f"{exc.reason}; default rules used instead", exc.fix, "error")
        return ProtocolRules.default()


def _walk(site_dir: Path) -> list[Path]:
    """All regular files below ``site_dir`` (sorted, deterministic), without the site's own files."""
    found = []
    for root, dirs, files in os.walk(site_dir):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if Path(root) == site_dir and name in SITE_FILES:
                continue
            if path.is_file():
                found.append(path)
    return found


def _relative(path: Path, site_dir: Path | None) -> str:
    if site_dir is not None:
        try:
            return Path(path).relative_to(site_dir).as_posix()
        except ValueError:
            pass
    return Path(path).as_posix()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read_header(
    path: Path, site_dir: Path, problems: ProblemLog, skipped: dict[tuple[str, str], list[Path]]
) -> _Header | None:
    """Read one file's header (never its pixels); None when it is not a usable image instance."""
    where = _relative(path, site_dir)
    pixel_length: list[int] = []

    def stop_at_pixels(tag: int, vr: str | None, length: int) -> bool:
        # Same stop as dcmread(stop_before_pixels=True), remembering that pixel data is present.
        if tag in PIXEL_TAGS:
            pixel_length.append(length)
            return True
        return False

    try:
        with open(path, "rb") as fp:
            ds = read_partial(fp, stop_when=stop_at_pixels, force=False)
            after_header = fp.tell()
        size = path.stat().st_size
    except InvalidDicomError:
        problems.add(where, "not a DICOM file (no DICM preamble); ignored", "nothing to do", "info")
        return None
    except Exception as exc:  # noqa: BLE001 - a corrupt file is reported, never raised
        problems.add(
            where,
            f"unreadable DICOM header ({type(exc).__name__}: {_first_line(exc)}); file corrupt or truncated, skipped",
            "re-export this file from PACS",
        )
        return None

    meta = ds.file_meta
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
    sop_class = UID(str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "")))
    modality = str(ds.get("Modality", "") or "")
    if not sop_class.name.endswith("Image Storage"):
        skipped[
            (
                series_uid,
                f"not an image ({sop_class.name or 'unknown SOP class'}, Modality {modality or '?'})",
            )
        ].append(path)
        return None
    if not pixel_length:
        skipped[(series_uid, f"no pixel data ({sop_class.name}); file may be truncated")].append(path)
        return None
    if modality not in MODALITIES:
        skipped[(series_uid, f"modality {modality or '?'} is not used (only MR and CT)")].append(path)
        return None
    syntax = UID(transfer_syntax)
    # A deflated file's offsets are in the inflated stream; undefined lengths are encapsulated.
    if syntax.is_transfer_syntax and not syntax.is_deflated and pixel_length[0] != 0xFFFFFFFF:
        header_bytes = 8 if syntax.is_implicit_VR else 12
        if after_header + header_bytes + pixel_length[0] > size:
            problems.add(
                where,
                f"file truncated: pixel data needs {pixel_length[0]} bytes, only "
                f"{max(size - after_header - header_bytes, 0)} present; skipped",
                "re-export this file from PACS",
            )
            return None

    header = _Header(
        path=path,
        series_uid=series_uid,
        patient_id=str(ds.get("PatientID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        modality=modality,
        description=str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or "").strip(),
        transfer_syntax=transfer_syntax,
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        instance=int(ds.get("InstanceNumber", 0) or 0),
        thickness=(
            _tag_values(ds, "SpacingBetweenSlices", 1) or _tag_values(ds, "SliceThickness", 1) or [None]
        )[0],
    )
    try:
        header.frames = _frame_geometry(ds, path)
    except _GeometryError as exc:
        header.geometry_error = exc
    return header


def _tag_values(item: Dataset | None, keyword: str, count: int) -> list[float] | None:
    """``count`` floats of ``keyword`` in ``item``, or None when absent or malformed."""
    if item is None or keyword not in item:
        return None
    value = item.get(keyword)
    values = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return floats if len(floats) == count and all(np.isfinite(floats)) else None


def _functional_group(
    per_frame: Dataset | None, shared: Dataset | None, sequence: str, keyword: str, count: int
):
    """A value from a per-frame functional group, falling back to the shared one."""
    for group in (per_frame, shared):
        if group is not None and sequence in group and len(group[sequence].value):
            found = _tag_values(group[sequence].value[0], keyword, count)
            if found is not None:
                return found
    return None


def _frame_geometry(ds: Dataset, path: Path) -> list[tuple[FrameRef, np.ndarray, tuple[float, float]]]:
    """Per frame: (FrameRef, ImageOrientationPatient (6,), PixelSpacing (row, col)).

    Handles single-frame files, enhanced multi-frame files (geometry in the per-frame and
    shared functional groups) and classic multi-frame files (one position plus a frame step).

    Raises:
        _GeometryError: naming the missing tag.
    """
    n_frames = int(ds.get("NumberOfFrames") or 1)
    top_slope = (_tag_values(ds, "RescaleSlope", 1) or [1.0])[0]
    top_intercept = (_tag_values(ds, "RescaleIntercept", 1) or [0.0])[0]
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        per_frames = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
        shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
        shared = shared_seq[0] if len(shared_seq) else None
        if len(per_frames) not in (0, n_frames):
            raise _GeometryError(
                "PerFrameFunctionalGroupsSequence", f"has {len(per_frames)} items for {n_frames} frames"
            )
        frames = []
        for index in range(n_frames):
            item = per_frames[index] if per_frames else None
            position = _functional_group(item, shared, "PlanePositionSequence", "ImagePositionPatient", 3)
            orientation = _functional_group(
                item, shared, "PlaneOrientationSequence", "ImageOrientationPatient", 6
            )
            spacing = _functional_group(item, shared, "PixelMeasuresSequence", "PixelSpacing", 2)
            for tag, value in (
                ("ImagePositionPatient", position),
                ("ImageOrientationPatient", orientation),
                ("PixelSpacing", spacing),
            ):
                if value is None:
                    raise _GeometryError(tag, f"in the functional groups of frame {index + 1}")
            slope = _functional_group(item, shared, "PixelValueTransformationSequence", "RescaleSlope", 1)
            intercept = _functional_group(
                item, shared, "PixelValueTransformationSequence", "RescaleIntercept", 1
            )
            ref = FrameRef(
                path,
                index,
                tuple(position),
                (slope or [top_slope])[0],
                (intercept or [top_intercept])[0],
            )
            frames.append((ref, np.asarray(orientation), (spacing[0], spacing[1])))
        return frames

    position = _tag_values(ds, "ImagePositionPatient", 3)
    orientation = _tag_values(ds, "ImageOrientationPatient", 6)
    spacing = _tag_values(ds, "PixelSpacing", 2)
    for tag, value in (
        ("ImagePositionPatient", position),
        ("ImageOrientationPatient", orientation),
        ("PixelSpacing", spacing),
    ):
        if value is None:
            raise _GeometryError(tag)
    orientation_array = np.asarray(orientation)
    if n_frames == 1:
        return [
            (
                FrameRef(path, None, tuple(position), top_slope, top_intercept),
                orientation_array,
                tuple(spacing),
            )
        ]
    # Classic multi-frame: frames are parallel slices stepping along the normal.
    normal = _normal(orientation_array)
    offsets = _tag_values(ds, "GridFrameOffsetVector", n_frames)
    if offsets is None:
        step = (_tag_values(ds, "SpacingBetweenSlices", 1) or _tag_values(ds, "SliceThickness", 1) or [None])[
            0
        ]
        if not step:
            raise _GeometryError(
                "SpacingBetweenSlices", f"needed to place the {n_frames} frames of a multi-frame file"
            )
        offsets = [k * step for k in range(n_frames)]
    start = np.asarray(position)
    return [
        (
            FrameRef(path, k, tuple(start + offset * normal), top_slope, top_intercept),
            orientation_array,
            tuple(spacing),
        )
        for k, offset in enumerate(offsets)
    ]


def _normal(orientation: np.ndarray) -> np.ndarray:
    """Unit slice normal (row direction x column direction) of ImageOrientationPatient."""
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / max(np.linalg.norm(normal), 1e-12)


def _orientation_name(normal: np.ndarray) -> str:
    return ("SAG", "COR", "AX")[int(np.argmax(np.abs(normal)))]


def _build_series(
    headers: list[_Header], site_dir: Path, rules: ProtocolRules, problems: ProblemLog
) -> SeriesInfo | None:
    """Check one series' headers and geometry; None (with a problem) when it cannot be used."""
    headers = sorted(headers, key=lambda h: (h.instance, str(h.path)))
    first = headers[0]
    where = _relative(first.path, site_dir)
    label = f"series '{first.description or '(no description)'}'"
    reread = "re-export the complete series from PACS"

    if first.modality == "MR" and rules.ignores(first.description):
        # Localisers often mix three orientations: checking their geometry only makes noise.
        problems.add(
            where, f"{label}: ignored by the protocol rules (localiser); not used", "nothing to do", "info"
        )
        return None
    broken = [h for h in headers if h.geometry_error is not None]
    if broken:
        error = broken[0].geometry_error
        detail = f" ({error.detail})" if error.detail else ""
        problems.add(
            _relative(broken[0].path, site_dir),
            f"{label}: {error.tag} missing{detail} in {len(broken)} of {len(headers)} files; series skipped",
            f"re-export the series with its geometry ({error.tag}); it is needed to place the images",
        )
        return None
    if not first.patient_id:
        problems.add(
            where, f"{label}: no PatientID; series skipped", "re-export with the PatientID used in labels.csv"
        )
        return None
    if len({h.patient_id for h in headers}) > 1:
        problems.add(
            where, f"{label}: one SeriesInstanceUID used by several patients; series skipped", reread
        )
        return None
    if any(h.samples != 1 for h in headers):
        problems.add(
            where,
            f"{label}: colour images (SamplesPerPixel > 1); series skipped",
            "export the grayscale series",
        )
        return None
    sizes = Counter((h.rows, h.cols) for h in headers)
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sizes)
        problems.add(where, f"{label}: images of different sizes ({shown}); series skipped", reread)
        return None

    frames = [item for h in headers for item in h.frames]
    orientations = np.stack([o for _, o, _ in frames])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        problems.add(
            where,
            f"{label}: mixed orientations (ImageOrientationPatient differs between images); series skipped",
            "export each orientation as its own series",
        )
        return None
    spacings = np.asarray([s for _, _, s in frames])
    if np.abs(spacings - spacings[0]).max() > POSITION_TOLERANCE_MM:
        problems.add(where, f"{label}: PixelSpacing differs between images; series skipped", reread)
        return None

    orientation = orientations[0]
    normal = _normal(orientation)
    refs = [ref for ref, _, _ in frames]
    depth = np.asarray([np.dot(ref.position, normal) for ref in refs])
    order = np.argsort(depth, kind="stable")
    refs = [refs[i] for i in order]
    depth = depth[order]

    keep = np.concatenate([[True], np.diff(depth) > POSITION_TOLERANCE_MM])
    if not keep.all():
        problems.add(
            where,
            f"{label}: {int((~keep).sum())} images at duplicate slice positions; the first of each kept",
            "check that the export holds one acquisition per series",
        )
        refs = [ref for ref, k in zip(refs, keep, strict=True) if k]
        depth = depth[keep]

    if len(refs) > 1:
        steps = np.diff(depth)
        median = float(np.median(steps))
        # The smallest step is the regular spacing: a median of few steps can hide a gap.
        regular = float(steps.min())
        if steps.max() > GAP_FACTOR * regular:
            problems.add(
                where,
                f"{label}: gap of {steps.max():.2f} mm between slices (regular spacing {regular:.2f} mm): "
                "slices are missing; series skipped",
                reread,
            )
            return None
        if np.abs(steps - median).max() > max(POSITION_TOLERANCE_MM, 0.05 * median):
            problems.add(
                where,
                f"{label}: slice spacing varies from {steps.min():.2f} to {steps.max():.2f} mm; "
                "loaded with the mean spacing",
                "check the export; nothing to do if the variation is small",
            )
        slice_step = (np.asarray(refs[-1].position) - np.asarray(refs[0].position)) / (len(refs) - 1)
    else:
        # One slice: its thickness is the only hint of the slice step.
        slice_step = normal * (first.thickness or 1.0)

    affine = affine_from_dicom(np.asarray(refs[0].position), orientation, tuple(spacings[0]), slice_step)
    orientation_name = _orientation_name(normal)
    files = list(dict.fromkeys(ref.path for ref in refs))
    syntaxes = Counter(h.transfer_syntax for h in headers)
    return SeriesInfo(
        series_uid=first.series_uid,
        patient_id=first.patient_id,
        study_uid=first.study_uid,
        modality=first.modality,
        description=first.description,
        orientation=orientation_name,
        protocol=rules.match(first.description, orientation_name, first.modality),
        files=files,
        n_slices=len(refs),
        transfer_syntax=syntaxes.most_common(1)[0][0],
        rows=first.rows,
        cols=first.cols,
        frames=refs,
        affine=affine,
        site_dir=site_dir,
    )


def _keep_largest(patient: PatientScan, series: SeriesInfo, problems: ProblemLog) -> None:
    """Use ``series`` for its protocol key unless the patient already has a larger one."""
    key = series.protocol
    current = patient.series.get(key)
    if current is None:
        patient.series[key] = series
        return
    kept, dropped = (series, current) if series.n_slices > current.n_slices else (current, series)
    patient.series[key] = kept
    problems.add(
        dropped.relpath(),
        f"series '{dropped.description}' ({dropped.n_slices} slices) also maps to {key}; "
        f"the one with {kept.n_slices} slices ({kept.relpath()}) is used",
        "nothing to do, or narrow the rule in protocols.toml",
        "info",
    )
