"""Decoding a scanned series' pixels into a Volume, and which transfer syntaxes the installed plugins decode."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from common.problems import ProblemLog, first_line
from common.sitedata.dicom.bounded import read_bounded
from common.sitedata.dicom.limits import DEFAULT_LIMITS, DicomLimits, LimitExceeded, check_image, check_series
from common.sitedata.dicom.model import SeriesInfo
from common.sitedata.volume import Volume

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


def load_volume(
    series: SeriesInfo, log: ProblemLog | None = None, limits: DicomLimits = DEFAULT_LIMITS
) -> Volume | None:
    """Decode a scanned series into a float32 :class:`Volume` ``(S, R, C)`` with its LPS affine.

    Slices are in the order of their position along the slice normal (found by
    :func:`~common.sitedata.dicom.scan.scan_site`, not from InstanceNumber);
    RescaleSlope/Intercept are applied per frame.

    Every file is read within ``limits`` (header size, inflated size, image size checked before
    any pixel data is read or decoded).

    Returns:
        The volume, or None when a file cannot be decoded (a problem naming the file, the
        transfer syntax and the decoder plugin is added to ``log``) or is over ``limits``.
    """
    log = log if log is not None else ProblemLog()
    try:
        check_series(len(series.frames), series.rows, series.cols, limits)
    except LimitExceeded as exc:
        log.add(series.relpath(), exc.reason, exc.fix)
        return None
    pixels = np.empty((len(series.frames), series.rows, series.cols), dtype=np.float32)
    by_file: dict[Path, list[int]] = defaultdict(list)
    for index, frame in enumerate(series.frames):
        by_file[frame.path].append(index)
    for path, indices in by_file.items():
        array = _file_frames(series, path, log, limits)
        if array is None:
            return None
        for index in indices:
            frame = series.frames[index]
            image = array[frame.frame or 0].astype(np.float32)
            pixels[index] = image * np.float32(frame.slope) + np.float32(frame.intercept)
    return Volume(
        pixels=pixels, affine=series.affine.copy(), modality=series.modality, protocol=series.protocol
    )


def _file_frames(series: SeriesInfo, path: Path, log: ProblemLog, limits: DicomLimits) -> np.ndarray | None:
    """The stored frames of one file of ``series`` ``(n, R, C)``; None (with a problem) when unreadable."""
    where = series.relpath(path)
    try:
        ds = read_bounded(
            path, limits, pixels=True, check_header=lambda header: check_image(header, limits)
        ).ds
        ts = str(ds.file_meta.get("TransferSyntaxUID", series.transfer_syntax))
    except LimitExceeded as exc:
        log.add(where, exc.reason, exc.fix)
        return None
    except Exception as exc:  # noqa: BLE001 - any read failure is reported, never raised
        log.add(where, f"cannot read file ({type(exc).__name__}: {first_line(exc)})", "re-export the series")
        return None
    try:
        array = _decode(ds, ts)
    except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
        log.add(
            where,
            f"cannot decode pixel data in {UID(ts).name} ({first_line(exc)}); {decoder_hint(ts)}",
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
    return array


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
