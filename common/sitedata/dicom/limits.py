"""Resource limits on one DICOM file and one series, so that a hostile file cannot take the site's memory."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

MIB = 1 << 20
GIB = 1 << 30
MAX_BITS_ALLOCATED = 64  # the most the DICOM standard allows (Double Float Pixel Data)
MAX_SAMPLES_PER_PIXEL = 4  # 1 grayscale, 3 RGB/YBR, 4 the retired ARGB/CMYK
LIMIT_FIX = (
    "nothing to do if the file is not a clinical image; otherwise re-export the series from PACS "
    "(one file per image, uncompressed)"
)


@dataclass(frozen=True)
class DicomLimits:
    """The most one file (or series) may hold before it is refused unread.

    The defaults are generous for clinical MR and CT (a 512 x 512 x 2000 enhanced CT, a
    1024 x 1024 MR, an enhanced MR of several thousand frames with its functional groups) and
    far below what would exhaust a site machine. See docs/site-data.md.

    Attributes:
        max_file_bytes: size of a file on disk.
        max_header_bytes: bytes of a file before its pixel data (the inflated bytes for the
            Deflated transfer syntax); private tags and functional groups count.
        max_inflated_bytes: what a Deflated file may inflate to (header and pixel data).
        max_rows: Rows of an image.
        max_columns: Columns of an image.
        max_frames: NumberOfFrames of one file.
        max_voxels_per_file: rows x columns x frames of one file.
        max_pixel_bytes: decoded pixel bytes of one file (voxels x samples x BitsAllocated / 8).
        max_voxels_per_series: slices x rows x columns of a series (its float32 volume is 4 bytes
            a voxel).
    """

    max_file_bytes: int = 2 * GIB
    max_header_bytes: int = 32 * MIB
    max_inflated_bytes: int = 2 * GIB
    max_rows: int = 4096
    max_columns: int = 4096
    max_frames: int = 10_000
    max_voxels_per_file: int = 500_000_000
    max_pixel_bytes: int = 2 * GIB
    max_voxels_per_series: int = 1_000_000_000


DEFAULT_LIMITS = DicomLimits()


class LimitExceeded(Exception):
    """A file (or series) over one of the :class:`DicomLimits`; ``reason`` is the one-line problem."""

    def __init__(
        self, what: str, value: int | float, limit: int | float, unit: str, why: str, skipped: str = "file"
    ) -> None:
        self.what, self.value, self.limit, self.unit, self.why = what, value, limit, unit, why
        self.skipped = skipped
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return (
            f"{self.what} {amount(self.value)}{unit} exceeds the limit {amount(self.limit)}{unit}: "
            f"{self.why}, {self.skipped} skipped"
        )

    @property
    def fix(self) -> str:
        return LIMIT_FIX


def amount(value: int | float) -> str:
    """A number as a problem line shows it: exact below 100,000, else like ``4.3e12``."""
    if value < 100_000 and float(value).is_integer():
        return str(int(value))
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def check_file_size(size: int, limits: DicomLimits) -> None:
    """Raise :class:`LimitExceeded` when a file of ``size`` bytes is over ``max_file_bytes``."""
    if size > limits.max_file_bytes:
        raise LimitExceeded("file of", size, limits.max_file_bytes, "bytes", "not a clinical MR/CT file")


def check_image(ds: Dataset, limits: DicomLimits) -> None:
    """Raise :class:`LimitExceeded` when the image ``ds`` describes is over a limit (nothing is allocated)."""
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames = max(_int(ds, "NumberOfFrames", 1), 1)
    samples, bits = _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated", 16)
    voxels = rows * cols * frames
    shape = f"rows {rows} x columns {cols} x {frames} frames ="
    if voxels > limits.max_voxels_per_file:
        raise LimitExceeded(shape, voxels, limits.max_voxels_per_file, "voxels", "not a clinical MR/CT image")
    for what, value, limit in (
        ("rows", rows, limits.max_rows),
        ("columns", cols, limits.max_columns),
        ("frames", frames, limits.max_frames),
        ("samples per pixel", samples, MAX_SAMPLES_PER_PIXEL),
    ):
        if value > limit:
            raise LimitExceeded(what, value, limit, "", "not a clinical MR/CT image")
    if bits > MAX_BITS_ALLOCATED:
        raise LimitExceeded("bits allocated", bits, MAX_BITS_ALLOCATED, "", "not a DICOM image")
    pixel_bytes = (voxels * samples * bits + 7) // 8
    if pixel_bytes > limits.max_pixel_bytes:
        raise LimitExceeded(
            f"{shape} {amount(voxels)} voxels x {samples} samples x {bits} bits =",
            pixel_bytes,
            limits.max_pixel_bytes,
            "bytes",
            "not a clinical MR/CT image",
        )


def check_series(n_slices: int, rows: int, cols: int, limits: DicomLimits) -> None:
    """Raise :class:`LimitExceeded` when a series' volume is over ``max_voxels_per_series``."""
    voxels = n_slices * rows * cols
    if voxels > limits.max_voxels_per_series:
        raise LimitExceeded(
            f"series of {n_slices} slices x rows {rows} x columns {cols} =",
            voxels,
            limits.max_voxels_per_series,
            "voxels",
            "not a clinical MR/CT series",
            "series",
        )


def _int(ds: Dataset, keyword: str, default: int) -> int:
    """An integer tag of ``ds``; ``default`` when absent, empty or not a number."""
    try:
        value = ds.get(keyword, default)
        return int(value) if value not in (None, "") else default
    except Exception:  # noqa: BLE001 - a malformed value is judged by the readers after
        return default
