"""Files a crash never leaves half-written: write to a temporary file beside, fsync, then rename."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one.

    The bytes go to a temporary file in the same folder, are flushed to disk (``fsync``) and
    then renamed over ``path`` (atomic on POSIX). ``mode`` (e.g. ``0o600``) is applied before
    the rename, so the file is never readable with wider permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of an uncompressed ``.npz`` file."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` (.npz) so that readers never see a partial file."""
    write_atomic(path, npz_bytes(arrays))


def user_cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/onfh/PARTS`` (default ``~/.cache/onfh/PARTS``), created readable by this user only.

    Caches hold images and patient hashes: never beside a hospital's export (which may be a
    read-only PACS mount or a shared drive), always where only this user can read them.
    """
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").absolute()
    folder = base.joinpath("onfh", *parts)
    folder.mkdir(parents=True, exist_ok=True)
    for level in [base / "onfh", *(base.joinpath("onfh", *parts[: i + 1]) for i in range(len(parts)))]:
        if level.stat().st_uid == os.getuid():
            level.chmod(0o700)
    return folder


def json_safe(value: Any) -> Any:
    """Nested dicts/lists with NaN/inf replaced by None and numpy scalars by Python ones (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
