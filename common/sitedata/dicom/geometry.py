"""Where each frame of a DICOM file lies: positions, orientations and pixel spacings from its tags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from common.sitedata.dicom.model import FrameRef

# One frame's place: (FrameRef, ImageOrientationPatient (6,), PixelSpacing (row, col)).
FrameGeometry = tuple[FrameRef, np.ndarray, tuple[float, float]]
GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


class GeometryError(Exception):
    """A frame lacks a geometry tag; ``tag`` names it."""

    def __init__(self, tag: str, detail: str = "") -> None:
        super().__init__(tag)
        self.tag = tag
        self.detail = detail


def tag_values(item: Dataset | None, keyword: str, count: int) -> list[float] | None:
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


def slice_step_tag(ds: Dataset) -> float | None:
    """SpacingBetweenSlices, else SliceThickness, else None."""
    return (tag_values(ds, "SpacingBetweenSlices", 1) or tag_values(ds, "SliceThickness", 1) or [None])[0]


def _functional_group(
    per_frame: Dataset | None, shared: Dataset | None, sequence: str, keyword: str, count: int
):
    """A value from a per-frame functional group, falling back to the shared one."""
    for group in (per_frame, shared):
        if group is not None and sequence in group and len(group[sequence].value):
            found = tag_values(group[sequence].value[0], keyword, count)
            if found is not None:
                return found
    return None


def frame_geometry(ds: Dataset, path: Path) -> list[FrameGeometry]:
    """Per frame: (FrameRef, ImageOrientationPatient (6,), PixelSpacing (row, col)).

    Handles single-frame files, enhanced multi-frame files (geometry in the per-frame and
    shared functional groups) and classic multi-frame files (one position plus a frame step).

    Raises:
        GeometryError: naming the missing tag.
    """
    n_frames = int(ds.get("NumberOfFrames") or 1)
    top_slope = (tag_values(ds, "RescaleSlope", 1) or [1.0])[0]
    top_intercept = (tag_values(ds, "RescaleIntercept", 1) or [0.0])[0]
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds, path, n_frames, top_slope, top_intercept)
    return _plain_frames(ds, path, n_frames, top_slope, top_intercept)


def _enhanced_frames(
    ds: Dataset, path: Path, n_frames: int, top_slope: float, top_intercept: float
) -> list[FrameGeometry]:
    """Frames of an enhanced multi-frame file: geometry in the per-frame and shared functional groups."""
    per_frames = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if len(shared_seq) else None
    if len(per_frames) not in (0, n_frames):
        raise GeometryError(
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
        for tag, value in zip(GEOMETRY_TAGS, (position, orientation, spacing), strict=True):
            if value is None:
                raise GeometryError(tag, f"in the functional groups of frame {index + 1}")
        slope = _functional_group(item, shared, "PixelValueTransformationSequence", "RescaleSlope", 1)
        intercept = _functional_group(item, shared, "PixelValueTransformationSequence", "RescaleIntercept", 1)
        ref = FrameRef(
            path,
            index,
            tuple(position),
            (slope or [top_slope])[0],
            (intercept or [top_intercept])[0],
        )
        frames.append((ref, np.asarray(orientation), (spacing[0], spacing[1])))
    return frames


def _plain_frames(
    ds: Dataset, path: Path, n_frames: int, top_slope: float, top_intercept: float
) -> list[FrameGeometry]:
    """Frames of a single-frame file, or of a classic multi-frame file (one position plus a step)."""
    position = tag_values(ds, "ImagePositionPatient", 3)
    orientation = tag_values(ds, "ImageOrientationPatient", 6)
    spacing = tag_values(ds, "PixelSpacing", 2)
    for tag, value in zip(GEOMETRY_TAGS, (position, orientation, spacing), strict=True):
        if value is None:
            raise GeometryError(tag)
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
    normal = slice_normal(orientation_array)
    offsets = tag_values(ds, "GridFrameOffsetVector", n_frames)
    if offsets is None:
        step = slice_step_tag(ds)
        if not step:
            raise GeometryError(
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


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """Unit slice normal (row direction x column direction) of ImageOrientationPatient."""
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / max(np.linalg.norm(normal), 1e-12)


def orientation_name(normal: np.ndarray) -> str:
    """``"SAG"``, ``"COR"`` or ``"AX"``: the patient axis closest to the slice normal."""
    return ("SAG", "COR", "AX")[int(np.argmax(np.abs(normal)))]
