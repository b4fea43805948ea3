"""A site's data, ready to train on: hips and MR-CT pairs, built from DICOM once and cached.

``load_site`` is the one entry point the trainers, the ClientApp and ``onfh check`` use:
scan DICOM -> per patient: build volumes, localise both femoral heads, crop every protocol,
register the CT and cut MR/CT slice pairs -> join the labels CSV -> split by patient.

The cache (under ``cache_dir``) never stores a patient identifier: patients are keyed by a
salted hash whose salt stays in the cache folder. Source files are only ever read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.dicom_io import PatientScan, load_volume, scan_site
from common.femoral_head import LocalizationError, localize_femoral_heads
from common.hip_crop import crop_hip_protocols
from common.labels import HipLabel, read_labels, split_patients
from common.problems import Problem, ProblemLog
from common.protocols import ProtocolRules
from common.registration import ct_pairs_for_hip, register_rigid
from common.settings import PreprocessSettings

log = logging.getLogger("onfh.site")

SIDES = ("R", "L")
CACHE_VERSION = 1


@dataclass
class SiteData:
    """Everything a site trains and evaluates on. Arrays are aligned per hip / per pair."""

    name: str
    protocols: tuple[str, ...]
    patient_keys: np.ndarray  # (N,) str, pseudonymous
    sides: np.ndarray  # (N,) "R" / "L"
    images: np.ndarray  # (N, P, K, H, W) float32
    available: np.ndarray  # (N, P) bool
    stages: np.ndarray  # (N,) int: 1..4 labelled, 0 unlabelled or healthy
    confidence: np.ndarray  # (N,) localisation confidence in [0, 1]
    pairs_mr: np.ndarray  # (M, H, W) float32
    pairs_ct: np.ndarray  # (M, H, W) float32 in [-1, 1]
    pair_keys: np.ndarray  # (M,) patient key of each pair
    split: dict[str, str]  # patient key -> "train" / "val" / "test"
    problems: ProblemLog = field(default_factory=ProblemLog)
    stats: dict = field(default_factory=dict)

    def _in(self, keys: np.ndarray, splits: tuple[str, ...]) -> np.ndarray:
        return np.array([self.split.get(k) in splits for k in keys], dtype=bool)

    def staging_set(self, *splits: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labelled hips of the given splits: images (n,P,K,H,W), available (n,P), stages (n,) 1..4."""
        mask = self._in(self.patient_keys, splits) & (self.stages > 0)
        return self.images[mask], self.available[mask], self.stages[mask]

    def pair_set(self, *splits: str) -> tuple[np.ndarray, np.ndarray]:
        """MR/CT slice pairs of patients in the given splits: (m,H,W), (m,H,W)."""
        mask = self._in(self.pair_keys, splits)
        return self.pairs_mr[mask], self.pairs_ct[mask]


def _salt(cache_dir: Path) -> bytes:
    path = cache_dir / "pseudonym.salt"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(32))
        os.chmod(path, 0o600)
    return path.read_bytes()


def patient_key(patient_id: str, salt: bytes) -> str:
    """Pseudonym of a patient, stable within a site, meaningless outside it."""
    return hashlib.sha256(salt + patient_id.encode()).hexdigest()[:16]


def _file_fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _site_fingerprint(site_dir: Path) -> str:
    """Cheap fingerprint of every file under the site folder (names, sizes, mtimes)."""
    files = [Path(root) / name for root, _, names in os.walk(site_dir) for name in names]
    return _file_fingerprint(files)


@dataclass
class _PatientResult:
    key: str
    centres: dict[str, np.ndarray]
    images: dict[str, np.ndarray]
    available: dict[str, np.ndarray]
    confidence: dict[str, float]
    pairs_mr: np.ndarray
    pairs_ct: np.ndarray
    problems: list[Problem]
    registration_mm: list[float]


def _process_patient(
    scan: PatientScan,
    key: str,
    settings: PreprocessSettings,
    manual_centres: dict[str, tuple[float, float, float]],
    site_dir: Path,
) -> _PatientResult:
    """Volumes -> femoral heads -> crops -> CT pairs for one patient. Never raises on bad data."""
    problems = ProblemLog()
    grid = settings.grid
    empty = np.zeros((0, grid.size, grid.size), np.float32)
    result = _PatientResult(key, {}, {}, {}, {}, empty, empty, problems, [])
    volumes = {}
    for protocol, series in scan.series.items():
        if protocol == "CT":
            continue
        volume = load_volume(series, problems)
        if volume is not None:
            volumes[protocol] = volume
    where = _rel(scan.series[next(iter(scan.series))].files[0], site_dir) if scan.series else "?"
    anchor = volumes.get(settings.anchor_protocol) or next(
        (v for k, v in volumes.items() if v.orientation == "COR"), None
    )
    heads = {}
    if anchor is not None:
        try:
            heads = localize_femoral_heads(anchor)
        except LocalizationError as exc:
            problems.add(
                where,
                f"femoral heads not found on the coronal MR ({exc})",
                "give the centres in labels.csv (fh_x_mm, fh_y_mm, fh_z_mm)",
            )
    elif not manual_centres:
        problems.add(
            where,
            "no coronal MR series to localise the femoral heads",
            "export a coronal T1 series, or give the centres in labels.csv",
        )
    for side in SIDES:
        if side in manual_centres:
            centre, confidence = np.asarray(manual_centres[side], float), 1.0
        elif side in heads:
            centre, confidence = heads[side].centre_mm, float(heads[side].confidence)
        else:
            continue
        crops = crop_hip_protocols(volumes, centre, side, settings)
        for note in crops.notes:
            problems.add(where, note, "check the series' field of view", "warning")
        if not crops.available.any():
            problems.add(where, f"{side} hip: no protocol covers the femoral head", "check the series")
            continue
        result.centres[side] = centre
        result.images[side] = crops.image
        result.available[side] = crops.available
        result.confidence[side] = confidence
    if "CT" in scan.series and result.centres:
        ct = load_volume(scan.series["CT"], problems)
        fixed = volumes.get(settings.anchor_protocol) or anchor
        if ct is not None and fixed is not None:
            reg = register_rigid(fixed, ct, centres_mm=list(result.centres.values()))
            mr_parts, ct_parts = [], []
            for side, centre in result.centres.items():
                mr, ct_slices = ct_pairs_for_hip(volumes, ct, reg.matrix, centre, side, settings)
                mr_parts.append(mr)
                ct_parts.append(ct_slices)
            result.pairs_mr = np.concatenate(mr_parts).astype(np.float32)
            result.pairs_ct = np.concatenate(ct_parts).astype(np.float32)
            result.registration_mm = [float(x) for x in reg.translation_mm]
    return result


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def load_site(
    site_dir: Path,
    cache_dir: Path,
    settings: PreprocessSettings | None = None,
    split_seed: int = 0,
    name: str | None = None,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
) -> SiteData:
    """Build (or reuse from cache) a site's hips and pairs.

    Args:
        site_dir: the hospital's export: DICOM anywhere below, ``labels.csv``, optional
            ``protocols.toml``. Only read.
        cache_dir: where preprocessed patients are kept (site-local, never shared).
        settings: preprocessing settings; part of the cache key.
        split_seed: seed of the train/val/test split by patient.
        workers: processes for the cold path.
        progress: called with one line per processed patient.
    Raises:
        ValueError: the folder does not exist (message names it).
    """
    site_dir, cache_dir = Path(site_dir), Path(cache_dir)
    settings = settings or PreprocessSettings()
    if not site_dir.is_dir():
        raise ValueError(f"site folder {site_dir} does not exist: pass the folder holding the DICOM export")
    salt = _salt(cache_dir)
    bucket = cache_dir / f"v{CACHE_VERSION}-{settings.fingerprint()}"
    bucket.mkdir(parents=True, exist_ok=True)
    site_fp = _site_fingerprint(site_dir)
    index_path = bucket / "site.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    problems = ProblemLog()
    labels = read_labels(site_dir / "labels.csv", problems)

    if index.get("fingerprint") == site_fp and (bucket / "site.npz").exists():
        arrays = dict(np.load(bucket / "site.npz"))
        problems.extend(Problem(**p) for p in index["problems"])
        stats = index["stats"]
    else:
        arrays, scan_problems, stats = _build(site_dir, bucket, settings, salt, labels, workers, progress)
        problems.extend(scan_problems)
        np.savez(bucket / "site.npz", **arrays)
        index_path.write_text(
            json.dumps(
                {
                    "fingerprint": site_fp,
                    "problems": [p.__dict__ for p in scan_problems],
                    "stats": stats,
                }
            )
        )
    # Labels are joined after the cache so that editing labels.csv never forces preprocessing.
    stage_of = {(patient_key(h.patient_id, salt), h.side): h.stage for h in labels if h.stage}
    keys = arrays["patient_keys"].astype(str)
    sides = arrays["sides"].astype(str)
    stages = np.array([stage_of.get((k, s), 0) for k, s in zip(keys, sides, strict=True)], dtype=np.int64)
    known = set(keys)
    for h in labels:
        if patient_key(h.patient_id, salt) not in known:
            problems.add(
                "labels.csv",
                f"a labelled patient (row for side {h.side}) has no usable study",
                "check the patient_id against the DICOM PatientID",
                "warning",
            )
    split = split_patients(sorted(known | set(arrays["pair_keys"].astype(str))), seed=split_seed)
    stats = {**stats, "labelled_hips": int((stages > 0).sum())}
    return SiteData(
        name=name or site_dir.name,
        protocols=tuple(settings.protocols),
        patient_keys=keys,
        sides=sides,
        images=arrays["images"].astype(np.float32),
        available=arrays["available"].astype(bool),
        stages=stages,
        confidence=arrays["confidence"],
        pairs_mr=arrays["pairs_mr"].astype(np.float32),
        pairs_ct=arrays["pairs_ct"].astype(np.float32),
        pair_keys=arrays["pair_keys"].astype(str),
        split=split,
        problems=problems,
        stats=stats,
    )


def _build(
    site_dir: Path,
    bucket: Path,
    settings: PreprocessSettings,
    salt: bytes,
    labels: list[HipLabel],
    workers: int,
    progress: Callable[[str], None] | None,
) -> tuple[dict, ProblemLog, dict]:
    problems = ProblemLog()
    rules_path = site_dir / "protocols.toml"
    rules = ProtocolRules.from_toml(rules_path) if rules_path.exists() else ProtocolRules.default()
    scan = scan_site(site_dir, rules, problems)
    manual: dict[str, dict[str, tuple[float, float, float]]] = {}
    for h in labels:
        if h.centre_mm is not None:
            manual.setdefault(h.patient_id, {})[h.side] = h.centre_mm
    jobs = []
    for pid, patient in sorted(scan.patients.items()):
        key = patient_key(pid, salt)
        files = [f for s in patient.series.values() for f in s.files]
        fp = _file_fingerprint(files) + json.dumps(manual.get(pid, {}), sort_keys=True)
        fp = hashlib.sha256(fp.encode()).hexdigest()[:24]
        jobs.append((patient, key, fp, manual.get(pid, {})))
    results: list[_PatientResult] = []
    todo = []
    for patient, key, fp, centres in jobs:
        cached = bucket / f"patient-{key}-{fp}.npz"
        if cached.exists():
            results.append(_read_patient(cached, key))
        else:
            todo.append((patient, key, centres, cached))
    if todo:
        run = _process_patient
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(workers) as pool:
                futures = [pool.submit(run, p, k, settings, c, site_dir) for p, k, c, _ in todo]
                outputs = [f.result() for f in futures]
        else:
            outputs = []
            for i, (p, k, c, _) in enumerate(todo):
                outputs.append(run(p, k, settings, c, site_dir))
                if progress:
                    progress(f"{site_dir.name}: patient {i + 1}/{len(todo)} preprocessed")
        for (_, _, _, path), out in zip(todo, outputs, strict=True):
            _write_patient(path, out)
            results.append(out)
    for r in results:
        problems.extend(r.problems)
    grid = settings.grid
    hip_keys, hip_sides, images, available, confidence = [], [], [], [], []
    pair_mr, pair_ct, pair_keys = [], [], []
    for r in results:
        for side in SIDES:
            if side in r.images:
                hip_keys.append(r.key)
                hip_sides.append(side)
                images.append(r.images[side])
                available.append(r.available[side])
                confidence.append(r.confidence[side])
        pair_mr.append(r.pairs_mr)
        pair_ct.append(r.pairs_ct)
        pair_keys.extend([r.key] * len(r.pairs_mr))
    shape = (len(settings.protocols), grid.slices, grid.size, grid.size)
    arrays = {
        "patient_keys": np.array(hip_keys, dtype="U16"),
        "sides": np.array(hip_sides, dtype="U1"),
        "images": np.stack(images).astype(np.float16) if images else np.zeros((0, *shape), np.float16),
        "available": np.array(available, dtype=bool).reshape(-1, len(settings.protocols)),
        "confidence": np.array(confidence, dtype=np.float32),
        "pairs_mr": np.concatenate(pair_mr).astype(np.float16)
        if pair_mr
        else np.zeros((0, grid.size, grid.size)),
        "pairs_ct": np.concatenate(pair_ct).astype(np.float16)
        if pair_ct
        else np.zeros((0, grid.size, grid.size)),
        "pair_keys": np.array(pair_keys, dtype="U16"),
    }
    stats = {
        "patients": len(scan.patients),
        "hips": len(hip_keys),
        "patients_with_ct_pairs": int(sum(len(r.pairs_mr) > 0 for r in results)),
        "pairs": int(sum(len(r.pairs_mr) for r in results)),
        "protocol_hips": {
            p: int(np.array(available)[:, i].sum()) if available else 0
            for i, p in enumerate(settings.protocols)
        },
        "low_confidence_hips": int(sum(c < 0.5 for c in confidence)),
    }
    return arrays, problems, stats


def _write_patient(path: Path, r: _PatientResult) -> None:
    sides = [s for s in SIDES if s in r.images]
    np.savez(
        path,
        sides=np.array(sides, dtype="U1"),
        images=np.stack([r.images[s] for s in sides]) if sides else np.zeros((0,)),
        available=np.stack([r.available[s] for s in sides]) if sides else np.zeros((0,)),
        centres=np.stack([r.centres[s] for s in sides]) if sides else np.zeros((0, 3)),
        confidence=np.array([r.confidence[s] for s in sides], dtype=np.float32),
        pairs_mr=r.pairs_mr,
        pairs_ct=r.pairs_ct,
        problems=np.array(json.dumps([p.__dict__ for p in r.problems])),
        registration_mm=np.array(r.registration_mm),
    )


def _read_patient(path: Path, key: str) -> _PatientResult:
    with np.load(path) as d:
        sides = [str(s) for s in d["sides"]]
        return _PatientResult(
            key=key,
            centres={s: d["centres"][i] for i, s in enumerate(sides)},
            images={s: d["images"][i] for i, s in enumerate(sides)},
            available={s: d["available"][i].astype(bool) for i, s in enumerate(sides)},
            confidence={s: float(d["confidence"][i]) for i, s in enumerate(sides)},
            pairs_mr=d["pairs_mr"],
            pairs_ct=d["pairs_ct"],
            problems=[Problem(**p) for p in json.loads(str(d["problems"]))],
            registration_mm=list(d["registration_mm"]),
        )
