"""The site cache on disk: buckets keyed by settings and code, per-patient files, the site index, pruning.

A bucket ``v<CACHE_VERSION>-<settings>-<code>`` holds ``settings.json`` (what produced it, for a
person reading the folder), one ``patient-<key>-<fingerprint>.npz`` per preprocessed patient and
``site.json`` / ``site.npz`` (the whole site, reused while no file of the site changed). Nothing
in it names a patient: keys are salted, and paths in problem text are tokens (see ``privacy``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import numpy as np

from common.files import npz_bytes, save_npz_atomic, write_atomic
from common.sitedata.labels import LABELS_FILE
from common.sitedata.patient import SIDES, PatientResult
from common.sitedata.privacy import SiteFiles
from common.sitedata.settings import PreprocessSettings

CACHE_VERSION = 4  # 4: settings.json in each bucket, code fingerprint over module objects
SETTINGS_FILE = "settings.json"
SITE_INDEX = "site.json"
SITE_ARRAYS = "site.npz"


def module_digest(module: ModuleType) -> str:
    """sha256 of a module's source file."""
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()


def code_fingerprint(modules: Iterable[ModuleType]) -> str:
    """Hash of the code of ``modules``, so an upgraded site never reuses hips built by older code."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:8]


def open_bucket(cache_dir: Path, settings: PreprocessSettings, modules: tuple[ModuleType, ...]) -> Path:
    """The bucket of these settings and this code (made, with its ``settings.json``, when new)."""
    code = code_fingerprint(modules)
    bucket = cache_dir / f"v{CACHE_VERSION}-{settings.fingerprint()}-{code}"
    bucket.mkdir(parents=True, exist_ok=True)
    if not (bucket / SETTINGS_FILE).exists():
        described = {
            "cache_version": CACHE_VERSION,
            "settings_fingerprint": settings.fingerprint(),
            "settings": asdict(settings),
            "code_fingerprint": code,
            "code": {module.__name__: module_digest(module)[:12] for module in modules},
        }
        write_atomic(bucket / SETTINGS_FILE, (json.dumps(described, indent=2) + "\n").encode())
    return bucket


def files_fingerprint(files: SiteFiles, rels: Iterable[str], extra: str = "") -> str:
    """Salted hash of the names, sizes and mtimes of ``rels`` (plus ``extra``)."""
    digest = hashlib.sha256(files.salt + f"v{CACHE_VERSION}|{extra}\n".encode())
    for rel in sorted(rels):
        size, mtime = files.stats.get(rel, (-1, -1))
        digest.update(f"{rel}|{size}|{mtime}\n".encode())
    return digest.hexdigest()[:24]


def dicom_fingerprint(files: SiteFiles, extra: str) -> str:
    """Fingerprint of every file the scan reads (labels.csv is joined after the cache)."""
    return files_fingerprint(files, (r for r in files.stats if r != LABELS_FILE), extra)


def patient_file(bucket: Path, key: str, fingerprint: str) -> Path:
    """Where a patient's preprocessed hips are kept, for this state of its files."""
    return bucket / f"patient-{key}-{fingerprint}.npz"


def write_patient(path: Path, result: PatientResult, files: SiteFiles, identifiers: list[str]) -> None:
    """Write one preprocessed patient, its problem text without paths or identifiers."""
    sides = [s for s in SIDES if s in result.images]
    cached_problems = [files.hide_problem(p, identifiers) for p in result.problems]
    arrays = {
        "sides": np.array(sides, dtype="U1"),
        "images": np.stack([result.images[s] for s in sides]) if sides else np.zeros((0,), np.float32),
        "available": np.stack([result.available[s] for s in sides]) if sides else np.zeros((0,), bool),
        "centres": np.stack([result.centres[s] for s in sides]) if sides else np.zeros((0, 3)),
        "confidence": np.array([result.confidence[s] for s in sides], dtype=np.float32),
        "pairs_mr": result.pairs_mr,
        "pairs_ct": result.pairs_ct,
        "problems": np.array(json.dumps(cached_problems)),
        "registration": result.registration if result.registration is not None else np.zeros((0, 4, 4)),
    }
    write_atomic(path, npz_bytes(arrays))


def read_patient(path: Path, key: str, files: SiteFiles) -> PatientResult | None:
    """A cached patient, or None when the file is absent or damaged (it is then re-processed)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            sides = [str(s) for s in data["sides"]]
            registration = data["registration"]
            return PatientResult(
                key=key,
                centres={s: data["centres"][i] for i, s in enumerate(sides)},
                images={s: data["images"][i] for i, s in enumerate(sides)},
                available={s: data["available"][i].astype(bool) for i, s in enumerate(sides)},
                confidence={s: float(data["confidence"][i]) for i, s in enumerate(sides)},
                pairs_mr=data["pairs_mr"],
                pairs_ct=data["pairs_ct"],
                problems=[files.show_problem(p) for p in json.loads(str(data["problems"]))],
                registration=registration if registration.shape == (4, 4) else None,
            )
    except Exception:  # noqa: BLE001 - a damaged patient file is re-processed, never fatal
        return None


def prune(bucket: Path, keep: set[str]) -> None:
    """Delete patient cache files no longer matching any patient (changed or removed files)."""
    for path in bucket.glob("patient-*.npz"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def read_site(bucket: Path, site_fp: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """The whole-site cache when it matches ``site_fp``; None when absent, stale or damaged."""
    try:
        index = json.loads((bucket / SITE_INDEX).read_text())
        if index.get("fingerprint") != site_fp:
            return None
        with np.load(bucket / SITE_ARRAYS) as data:
            arrays = {k: data[k] for k in data.files}
        return index, arrays
    except Exception:  # noqa: BLE001 - a damaged cache (bad JSON, bad zip) is rebuilt, never fatal
        return None


def write_site(bucket: Path, index: dict, arrays: dict[str, np.ndarray], site_fp: str) -> None:
    """Keep the whole site (arrays first: the index, written last, is what makes it count)."""
    save_npz_atomic(bucket / SITE_ARRAYS, arrays)
    write_atomic(bucket / SITE_INDEX, json.dumps({**index, "fingerprint": site_fp}).encode())
