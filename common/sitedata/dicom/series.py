"""Building one series from its files' headers: consistency checks, slice order, spacing, affine."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.problems import ProblemLog
from common.sitedata.dicom.geometry import FrameGeometry, orientation_name, slice_normal
from common.sitedata.dicom.header import Header
from common.sitedata.dicom.limits import DEFAULT_LIMITS, DicomLimits, LimitExceeded, check_series
from common.sitedata.dicom.model import FrameRef, SeriesInfo, relative
from common.sitedata.protocols import ProtocolRules
from common.sitedata.volume import affine_from_dicom

POSITION_TOLERANCE_MM = 0.01  # two slices closer than this are at the same position
ORIENTATION_TOLERANCE = 1e-3  # direction cosines that differ less are the same orientation
GAP_FACTOR = 1.5  # a step larger than this times the smallest step means missing slices
REREAD = "re-export the complete series from PACS"


@dataclass(frozen=True)
class _Where:
    """Where a series' problems point: its first file, and how the lines name the series."""

    path: str
    label: str


def build_series(
    headers: list[Header],
    site_dir: Path,
    rules: ProtocolRules,
    problems: ProblemLog,
    limits: DicomLimits = DEFAULT_LIMITS,
) -> SeriesInfo | None:
    """Check one series' headers, size and geometry; None (with a problem) when it cannot be used."""
    headers = sorted(headers, key=lambda h: (h.instance, str(h.path)))
    first = headers[0]
    where = _Where(relative(first.path, site_dir), f"series '{first.description or '(no description)'}'")
    if not _headers_usable(headers, site_dir, rules, problems, where):
        return None
    frames = [item for h in headers for item in h.frames]
    try:
        check_series(len(frames), first.rows, first.cols, limits)
    except LimitExceeded as exc:
        problems.add(where.path, f"{where.label}: {exc.reason}", exc.fix)
        return None
    if not _same_plane(frames, problems, where):
        return None
    orientation = frames[0][1]
    spacing = tuple(np.asarray(frames[0][2]))
    normal = slice_normal(orientation)
    refs, depth = _ordered_slices([ref for ref, _, _ in frames], normal, problems, where)
    slice_step = _slice_step(refs, depth, normal, first.thickness, problems, where)
    if slice_step is None:
        return None
    affine = affine_from_dicom(np.asarray(refs[0].position), orientation, spacing, slice_step)
    name = orientation_name(normal)
    syntaxes = Counter(h.transfer_syntax for h in headers)
    return SeriesInfo(
        series_uid=first.series_uid,
        patient_id=first.patient_id,
        study_uid=first.study_uid,
        modality=first.modality,
        description=first.description,
        orientation=name,
        protocol=rules.match(first.description, name, first.modality),
        files=list(dict.fromkeys(ref.path for ref in refs)),
        n_slices=len(refs),
        transfer_syntax=syntaxes.most_common(1)[0][0],
        rows=first.rows,
        cols=first.cols,
        frames=refs,
        affine=affine,
        site_dir=site_dir,
    )


def _headers_usable(
    headers: list[Header], site_dir: Path, rules: ProtocolRules, problems: ProblemLog, where: _Where
) -> bool:
    """The checks on the headers alone: rules, geometry tags, patient, colour, image size."""
    first, label = headers[0], where.label
    if first.modality == "MR" and rules.ignores(first.description):
        # Localisers often mix three orientations: checking their geometry only makes noise.
        problems.add(
            where.path,
            f"{label}: ignored by the protocol rules (localiser); not used",
            "nothing to do",
            "info",
        )
        return False
    broken = [h for h in headers if h.geometry_error is not None]
    if broken:
        error = broken[0].geometry_error
        detail = f" ({error.detail})" if error.detail else ""
        problems.add(
            relative(broken[0].path, site_dir),
            f"{label}: {error.tag} missing{detail} in {len(broken)} of {len(headers)} files; series skipped",
            f"re-export the series with its geometry ({error.tag}); it is needed to place the images",
        )
        return False
    if not first.patient_id:
        problems.add(
            where.path,
            f"{label}: no PatientID; series skipped",
            "re-export with the PatientID used in labels.csv",
        )
        return False
    if len({h.patient_id for h in headers}) > 1:
        problems.add(
            where.path, f"{label}: one SeriesInstanceUID used by several patients; series skipped", REREAD
        )
        return False
    if any(h.samples != 1 for h in headers):
        problems.add(
            where.path,
            f"{label}: colour images (SamplesPerPixel > 1); series skipped",
            "export the grayscale series",
        )
        return False
    sizes = Counter((h.rows, h.cols) for h in headers)
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sizes)
        problems.add(where.path, f"{label}: images of different sizes ({shown}); series skipped", REREAD)
        return False
    return True


def _same_plane(frames: list[FrameGeometry], problems: ProblemLog, where: _Where) -> bool:
    """Every frame has the same orientation and pixel spacing (else a problem, and False)."""
    orientations = np.stack([o for _, o, _ in frames])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        problems.add(
            where.path,
            f"{where.label}: mixed orientations (ImageOrientationPatient differs between images); series skipped",
            "export each orientation as its own series",
        )
        return False
    spacings = np.asarray([s for _, _, s in frames])
    if np.abs(spacings - spacings[0]).max() > POSITION_TOLERANCE_MM:
        problems.add(
            where.path, f"{where.label}: PixelSpacing differs between images; series skipped", REREAD
        )
        return False
    return True


def _ordered_slices(
    refs: list[FrameRef], normal: np.ndarray, problems: ProblemLog, where: _Where
) -> tuple[list[FrameRef], np.ndarray]:
    """Frames sorted along the slice normal, the first of each duplicate position kept; and their depths."""
    depth = np.asarray([np.dot(ref.position, normal) for ref in refs])
    order = np.argsort(depth, kind="stable")
    refs = [refs[i] for i in order]
    depth = depth[order]
    keep = np.concatenate([[True], np.diff(depth) > POSITION_TOLERANCE_MM])
    if not keep.all():
        problems.add(
            where.path,
            f"{where.label}: {int((~keep).sum())} images at duplicate slice positions; the first of each kept",
            "check that the export holds one acquisition per series",
        )
        refs = [ref for ref, k in zip(refs, keep, strict=True) if k]
        depth = depth[keep]
    return refs, depth


def _slice_step(
    refs: list[FrameRef],
    depth: np.ndarray,
    normal: np.ndarray,
    thickness: float | None,
    problems: ProblemLog,
    where: _Where,
) -> np.ndarray | None:
    """The step (LPS mm) from one slice to the next; None (with a problem) when slices are missing."""
    if len(refs) <= 1:
        # One slice: its thickness is the only hint of the slice step.
        return normal * (thickness or 1.0)
    steps = np.diff(depth)
    median = float(np.median(steps))
    # The smallest step is the regular spacing: a median of few steps can hide a gap.
    regular = float(steps.min())
    if steps.max() > GAP_FACTOR * regular:
        problems.add(
            where.path,
            f"{where.label}: gap of {steps.max():.2f} mm between slices (regular spacing {regular:.2f} mm): "
            "slices are missing; series skipped",
            REREAD,
        )
        return None
    if np.abs(steps - median).max() > max(POSITION_TOLERANCE_MM, 0.05 * median):
        problems.add(
            where.path,
            f"{where.label}: slice spacing varies from {steps.min():.2f} to {steps.max():.2f} mm; "
            "loaded with the mean spacing",
            "check the export; nothing to do if the variation is small",
        )
    return (np.asarray(refs[-1].position) - np.asarray(refs[0].position)) / (len(refs) - 1)
