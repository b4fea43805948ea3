"""An image volume in patient space: voxels plus the affine that places them (LPS millimetres)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Volume:
    """One reconstructed series.

    Attributes:
        pixels: float32 array ``(S, R, C)``: slices, rows, columns, with rescale slope and
            intercept applied (MR in scanner units, CT in Hounsfield units).
        affine: float64 ``(4, 4)`` mapping the homogeneous index ``(s, r, c, 1)`` to patient
            coordinates ``(x, y, z, 1)`` in millimetres, DICOM LPS convention (x to the
            patient's left, y to posterior, z to head). The right femoral head has x < 0.
        modality: ``"MR"`` or ``"CT"``.
        protocol: protocol key (e.g. ``"T1_COR"``), ``"CT"``, or ``None`` when unmapped.
    """

    pixels: np.ndarray
    affine: np.ndarray
    modality: str = "MR"
    protocol: str | None = None

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along (slice, row, column)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def normal(self) -> np.ndarray:
        """Unit vector of the slice direction in patient space."""
        v = self.affine[:3, 0]
        return v / np.linalg.norm(v)

    @property
    def orientation(self) -> str:
        """``"AX"``, ``"COR"`` or ``"SAG"``: the patient axis closest to the slice normal."""
        return ("SAG", "COR", "AX")[int(np.argmax(np.abs(self.normal)))]

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` voxel indices ``(s, r, c)`` to ``(..., 3)`` LPS mm."""
        index = np.asarray(index, dtype=np.float64)
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` LPS mm to fractional voxel indices ``(s, r, c)``."""
        points = np.asarray(points, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return points @ inv[:3, :3].T + inv[:3, 3]

    def sample(self, points: np.ndarray, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """Interpolate the volume at ``(..., 3)`` LPS mm points; outside the volume gives ``fill``."""
        points = np.asarray(points, dtype=np.float64)
        idx = self.world_to_index(points.reshape(-1, 3)).T
        values = ndimage.map_coordinates(self.pixels, idx, order=order, mode="constant", cval=fill)
        return values.reshape(points.shape[:-1]).astype(np.float32)


def affine_from_dicom(
    first_position: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
    slice_step: np.ndarray,
) -> np.ndarray:
    """Build the ``(s, r, c)`` -> LPS affine from DICOM geometry.

    Args:
        first_position: ImagePositionPatient of the first slice (after sorting).
        orientation: ImageOrientationPatient, six direction cosines (row direction, then
            column direction).
        pixel_spacing: PixelSpacing ``(between rows, between columns)`` in mm.
        slice_step: vector in mm from one slice's position to the next.
    """
    orientation = np.asarray(orientation, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    affine = np.eye(4)
    affine[:3, 0] = np.asarray(slice_step, dtype=np.float64)
    affine[:3, 1] = col_dir * float(pixel_spacing[0])  # moving down one row
    affine[:3, 2] = row_dir * float(pixel_spacing[1])  # moving right one column
    affine[:3, 3] = np.asarray(first_position, dtype=np.float64)
    return affine
