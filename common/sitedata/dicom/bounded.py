"""Reading a DICOM file through size-capped streams: the header, a bounded inflation of Deflated files, pixels."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import UID

from common.sitedata.dicom.limits import DicomLimits, LimitExceeded, check_file_size

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # PixelData, Double/Float PixelData
LAST_PIXEL_TAG = 0x7FE00010
INFLATE_CHUNK = 1 << 16  # compressed bytes read (and inflated bytes produced ahead) at a time

Exceeded = Callable[[int], LimitExceeded]  # the refusal for a read that would reach this many bytes


def header_exceeded(limits: DicomLimits) -> Exceeded:
    return lambda reach: LimitExceeded(
        "header (the data before the pixel data) of at least",
        reach,
        limits.max_header_bytes,
        "bytes",
        "huge private tags or sequences, not a clinical MR/CT header",
    )


def inflated_exceeded(limits: DicomLimits) -> Exceeded:
    return lambda reach: LimitExceeded(
        "Deflated data inflating to at least",
        reach,
        limits.max_inflated_bytes,
        "bytes",
        "a decompression bomb, not a clinical MR/CT image",
    )


class CappedFile:
    """A seekable binary file whose reads may not reach past ``limit``.

    A read that would is refused before reading (``exceeded`` raised) or, when ``exceeded`` is
    None, cut at ``limit`` as at the end of a file.
    """

    def __init__(self, fp: BinaryIO, limit: int, exceeded: Exceeded | None) -> None:
        self._fp = fp
        self.name = getattr(fp, "name", None)
        self.limit, self.exceeded = limit, exceeded

    def read(self, size: int | None = -1) -> bytes:
        position = self._fp.tell()
        if size is None or size < 0:
            size = max(self.limit - position, 0)
        if position + size > self.limit:
            if self.exceeded is not None:
                raise self.exceeded(position + size)
            size = max(self.limit - position, 0)
        return self._fp.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()


class InflatedStream:
    """The inflated bytes of a raw-deflate stream, inflated on demand and never past ``limit``.

    Seekable backwards (the inflated bytes so far are kept, at most ``limit`` of them); reading
    past ``limit`` raises before anything more is inflated.
    """

    def __init__(self, fp: BinaryIO, limit: int, exceeded: Exceeded) -> None:
        self._fp = fp
        self.name = getattr(fp, "name", None)
        self.limit, self.exceeded = limit, exceeded
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._inflated = bytearray()
        self._position = 0
        self._ended = False

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(self.limit - self._position, 0)
        end = self._position + size
        if end > self.limit:
            raise self.exceeded(end)
        self._inflate_to(end)
        data = bytes(self._inflated[self._position : end])
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence not in (0, 1):
            raise OSError("an inflated stream seeks from its start or the current position only")
        self._position = max(offset + (self._position if whence == 1 else 0), 0)
        return self._position

    def tell(self) -> int:
        return self._position

    def _inflate_to(self, end: int) -> None:
        """Inflate until ``end`` bytes are there or the stream ends, ahead by a chunk but never past ``limit``."""
        while len(self._inflated) < end and not self._ended:
            room = self.limit - len(self._inflated)
            want = min(max(end - len(self._inflated), INFLATE_CHUNK), room)
            compressed = self._inflater.unconsumed_tail or self._fp.read(INFLATE_CHUNK)
            if not compressed or self._inflater.eof:
                self._ended = True
                break
            produced = self._inflater.decompress(compressed, want)
            if not produced and self._inflater.unconsumed_tail == compressed:
                self._ended = True  # no progress: a corrupt stream
            self._inflated += produced


@dataclass
class BoundedRead:
    """A file read within the limits: the dataset, and where its pixel data starts."""

    ds: FileDataset
    size: int  # bytes on disk
    deflated: bool
    after_header: int = 0  # offset of the pixel data element (in the inflated stream when deflated)
    pixel_length: list[int] = field(default_factory=list)  # empty when the file has no pixel data


def read_bounded(
    path: Path,
    limits: DicomLimits,
    pixels: bool = False,
    check_header: Callable[[Dataset], None] | None = None,
) -> BoundedRead:
    """Read ``path`` within ``limits``: its header and, when ``pixels``, its pixel data too.

    The header (up to the pixel data) may not pass ``max_header_bytes``; a Deflated dataset is
    inflated as it is read, never past ``max_inflated_bytes``; ``check_header`` may refuse the
    header (e.g. an image too large) before any pixel data is read. Elements after the pixel
    data are never read.

    Raises:
        LimitExceeded: the file is over a limit; nothing beyond the limit was read or allocated.
        pydicom.errors.InvalidDicomError: not a DICOM file (no preamble and DICM prefix).
    """
    size = path.stat().st_size
    check_file_size(size, limits)
    with open(path, "rb") as fp:
        capped = CappedFile(fp, limits.max_header_bytes, header_exceeded(limits))
        preamble = read_preamble(capped, False)
        meta = _read_file_meta_info(capped)  # pydicom's own File Meta reader, through the cap
        syntax = UID(str(meta.get("TransferSyntaxUID", "") or pydicom.uid.ImplicitVRLittleEndian))
        implicit = syntax == pydicom.uid.ImplicitVRLittleEndian
        little = syntax != pydicom.uid.ExplicitVRBigEndian
        stream: CappedFile | InflatedStream = capped
        if syntax.is_deflated:
            stream = InflatedStream(fp, limits.max_header_bytes, header_exceeded(limits))
        read = BoundedRead(ds=None, size=size, deflated=syntax.is_deflated)  # type: ignore[arg-type]

        def at_pixels(tag: int, vr: str | None, length: int) -> bool:
            if tag in PIXEL_TAGS:
                read.pixel_length.append(length)
                return True
            return False

        header = read_dataset(stream, implicit, little, stop_when=at_pixels)
        read.after_header = stream.tell()
        if check_header is not None:
            check_header(header)
        if pixels and read.pixel_length:
            stream.limit = limits.max_inflated_bytes if read.deflated else size
            stream.exceeded = inflated_exceeded(limits) if read.deflated else None
            rest = read_dataset(
                stream,
                implicit,
                little,
                stop_when=lambda tag, vr, length: tag > LAST_PIXEL_TAG,
                parent_encoding=header.original_character_set,
            )
            header.update(rest)
    read.ds = FileDataset(str(path), header, preamble, meta, implicit, little)
    read.ds.set_original_encoding(implicit, little, header.original_character_set)
    return read
