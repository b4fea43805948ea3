"""What a DICOM scan of a site finds: frames, series, patients and the site (dataclasses only)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import UID

from common.problems import ProblemLog
from common.sitedata.protocols import ProtocolRules


def relative(path: Path, site_dir: Path | None) -> str:
    """``path`` relative to the site folder (as given when outside it), for problem lines."""
    if site_dir is not None:
        try:
            return Path(path).relative_to(site_dir).as_posix()
        except ValueError:
            pass
    return Path(path).as_posix()


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
        return relative(path or self.files[0], self.site_dir)


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
