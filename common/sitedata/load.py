"""A site's data, ready to train on: hips and MR-CT pairs, built from DICOM once and cached.

``load_site`` is the one entry point the trainers, the ClientApp and ``onfh check`` use:
scan DICOM -> per patient: build volumes, localise both femoral heads, crop every protocol,
register the CT and cut MR/CT slice pairs -> join the labels CSV -> split by patient.

The cache (under ``cache_dir``) never stores a patient identifier: patients are keyed by a
salted hash whose salt stays in the cache folder, and file paths in cached problem lines are
replaced by salted tokens that are turned back into paths only when the site is loaded.
Source files are only ever read.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import STAGES, PreprocessSettings
from common.problems import Problem, ProblemLog
from common.sitedata.dicom_io import PatientScan, load_volume, scan_site
from common.sitedata.femoral_head import LocalizationError, localize_femoral_heads
from common.sitedata.hip_crop import crop_hip_protocols
from common.sitedata.labels import HipLabel, read_labels, split_patients
from common.sitedata.registration import ct_pairs_for_hip, register_rigid
from common.sitedata.volume import Volume

log = logging.getLogger("onfh.site")

SIDES: tuple[str, ...] = ("R", "L")
CACHE_VERSION = 3
# Modules whose code decides what a cached hip holds: a change to any of them starts a new cache.
PREPROCESSING_MODULES = (
    "dicom_io.py",
    "femoral_head.py",
    "hip_crop.py",
    "registration.py",
    "volume.py",
    "load.py",
)


def preprocessing_code_fingerprint() -> str:
    """Hash of the preprocessing code, so an upgraded site never reuses hips built by older code."""
    digest = hashlib.sha256()
    for name in PREPROCESSING_MODULES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:8]


LOW_CONFIDENCE = 0.5  # localisation confidence below which a hip is worth a look
KEY_LENGTH = 16  # hex characters of a patient key
LABELS_FILE = "labels.csv"
_TOKEN = re.compile(r"@path:([0-9a-f]{16})")
_PATH_LIKE = re.compile(r"[^\s()\[\]'\",;]+")  # fragments of problem text that may be a path


@dataclass(frozen=True)
class PatientSummary:
    """What a site check shows of one patient (site-local; no identifier but the folder name).

    Attributes:
        key: pseudonymous patient key.
        folder: the folder holding the patient's series relative to the site folder, or one file
            of its anchor series when the files of many patients lie side by side (chosen by the
            hospital; may name the patient, so it is only shown locally, never cached or sent).
        protocols: protocol keys found for this patient (MR only).
        has_ct: a CT series was found.
        hips: sides (``"R"``, ``"L"``) that gave a hip.
        pairs: MR/CT slice pairs cut for this patient.
    """

    key: str
    folder: str
    protocols: tuple[str, ...]
    has_ct: bool
    hips: tuple[str, ...]
    pairs: int


@dataclass
class SiteData:
    """Everything a site trains and evaluates on. Arrays are aligned per hip / per pair.

    ``N`` hips, ``M`` MR/CT slice pairs, ``P`` protocols, ``K x H x W`` the hip crop grid.
    """

    name: str
    protocols: tuple[str, ...]
    patient_keys: np.ndarray  # (N,) str, pseudonymous
    sides: np.ndarray  # (N,) "R" / "L"
    images: np.ndarray  # (N, P, K, H, W) float32
    available: np.ndarray  # (N, P) bool
    stages: np.ndarray  # (N,) int: 1..4 labelled, 0 healthy (labels.csv 0) or unlabelled
    confidence: np.ndarray  # (N,) localisation confidence in [0, 1] (1 for a manual centre)
    pairs_mr: np.ndarray  # (M, H, W) float32
    pairs_ct: np.ndarray  # (M, H, W) float32 in [-1, 1]
    pair_keys: np.ndarray  # (M,) patient key of each pair
    split: dict[str, str]  # patient key -> "train" / "val" / "test"
    problems: ProblemLog = field(default_factory=ProblemLog)
    stats: dict = field(default_factory=dict)
    centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (N, 3) LPS mm, MR session
    healthy: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,) labelled stage 0
    registration: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (4, 4) MR -> CT mm
    patients: list[PatientSummary] = field(default_factory=list)

    def _in(self, keys: np.ndarray, splits: tuple[str, ...]) -> np.ndarray:
        return np.array([self.split.get(str(k)) in splits for k in keys], dtype=bool)

    def staging_set(self, *splits: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labelled hips (stages 1-4) of the given splits.

        Returns:
            ``images (n, P, K, H, W) float32``, ``available (n, P) bool``, ``stages (n,) 1..4``.
        """
        mask = self._in(self.patient_keys, splits) & (self.stages > 0)
        return self.images[mask], self.available[mask], self.stages[mask]

    def pair_set(self, *splits: str) -> tuple[np.ndarray, np.ndarray]:
        """MR/CT slice pairs of patients in the given splits: ``mr (m, H, W)``, ``ct (m, H, W)``."""
        mask = self._in(self.pair_keys, splits)
        return self.pairs_mr[mask], self.pairs_ct[mask]


def _salt(cache_dir: Path) -> bytes:
    path = cache_dir / "pseudonym.salt"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, secrets.token_bytes(32))
        os.chmod(path, 0o600)
    return path.read_bytes()


def patient_key(patient_id: str, salt: bytes) -> str:
    """Pseudonym of a patient, stable within a site (same salt), meaningless outside it."""
    return hashlib.sha256(salt + patient_id.encode()).hexdigest()[:KEY_LENGTH]


def split_id(patient_id: str) -> str:
    """What the train/val/test split hashes: the same on every install (unlike the salted key),
    so that a fresh cache, a second machine or a rebuilt site draws the same test patients.
    Kept in the site's cache only, beside the images; never sent."""
    return hashlib.sha256(b"onfh-split|" + patient_id.encode()).hexdigest()[:KEY_LENGTH]


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a cache file so that a reader never sees half of it (crash or parallel load)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class _SiteFiles:
    """One walk of the site folder: file stats for fingerprints, and path <-> token for the cache.

    Tokens (``@path:<16 hex>``, a salted hash of the relative path) stand for files and folders in
    cached problem text, since folder names often carry patient IDs, dates or accession numbers.
    """

    def __init__(self, site_dir: Path, salt: bytes) -> None:
        self.site_dir = site_dir
        self.salt = salt
        self.stats: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
        self._token_of: dict[str, str] = {}
        self._path_of: dict[str, str] = {}
        for root, dirs, names in os.walk(site_dir):
            dirs.sort()
            rel_root = Path(root).relative_to(site_dir).as_posix()
            if rel_root != ".":
                self._register(rel_root)
            for name in sorted(names):
                rel = name if rel_root == "." else f"{rel_root}/{name}"
                try:
                    stat = (Path(root) / name).stat()
                except OSError:  # a dangling link or a file removed meanwhile: scanning reports it
                    continue
                self.stats[rel] = (stat.st_size, stat.st_mtime_ns)
                self._register(rel)

    def _register(self, rel: str) -> None:
        token = hashlib.sha256(self.salt + b"path:" + rel.encode()).hexdigest()[:16]
        self._token_of[rel] = f"@path:{token}"
        self._path_of[token] = rel

    def fingerprint(self, rels: Iterable[str], extra: str = "") -> str:
        """Salted hash of the names, sizes and mtimes of ``rels`` (plus ``extra``)."""
        digest = hashlib.sha256(self.salt + f"v{CACHE_VERSION}|{extra}\n".encode())
        for rel in sorted(rels):
            size, mtime = self.stats.get(rel, (-1, -1))
            digest.update(f"{rel}|{size}|{mtime}\n".encode())
        return digest.hexdigest()[:24]

    def dicom_fingerprint(self, extra: str) -> str:
        """Fingerprint of every file the scan reads (labels.csv is joined after the cache)."""
        return self.fingerprint((r for r in self.stats if r != LABELS_FILE), extra)

    def rel(self, path: Path | str) -> str:
        try:
            return Path(path).relative_to(self.site_dir).as_posix()
        except ValueError:
            return Path(path).as_posix()

    def hide(self, text: str, identifiers: Iterable[str] = ()) -> str:
        """Replace paths of the site in ``text`` by tokens, and any identifier left by a mark."""
        if text in self._token_of:
            return self._token_of[text]
        text = text.replace(f"{self.site_dir.as_posix()}/", "")
        text = _PATH_LIKE.sub(self._token_for_fragment, text)
        for identifier in identifiers:
            if identifier:
                text = text.replace(identifier, "[patient id]")
        return text

    def _token_for_fragment(self, match: re.Match[str]) -> str:
        fragment = match.group(0)
        bare = fragment.rstrip(".:")  # a path ending a sentence
        if bare in self._token_of:
            return self._token_of[bare] + fragment[len(bare) :]
        return fragment

    def show(self, text: str) -> str:
        """Inverse of :meth:`hide` for paths still in the folder."""
        return _TOKEN.sub(lambda m: self._path_of.get(m.group(1), "(a file no longer in the folder)"), text)

    def hide_problem(self, problem: Problem, identifiers: Iterable[str] = ()) -> dict:
        identifiers = tuple(identifiers)
        return {
            "path": self.hide(problem.path, identifiers),
            "reason": self.hide(problem.reason, identifiers),
            "fix": self.hide(problem.fix, identifiers),
            "severity": problem.severity,
        }

    def show_problem(self, cached: dict) -> Problem:
        return Problem(
            self.show(cached["path"]),
            self.show(cached["reason"]),
            self.show(cached["fix"]),
            cached["severity"],
        )


@dataclass
class _PatientResult:
    """One patient preprocessed (what the patient cache file holds)."""

    key: str
    centres: dict[str, np.ndarray]
    images: dict[str, np.ndarray]
    available: dict[str, np.ndarray]
    confidence: dict[str, float]
    pairs_mr: np.ndarray
    pairs_ct: np.ndarray
    problems: list[Problem]
    registration: np.ndarray | None = None  # (4, 4) MR-session -> CT-session mm
    failed: bool = False  # an unexpected exception: never cached, retried on the next load


@dataclass
class _Job:
    """One patient to process: its scan, pseudonym, fingerprint and cache file."""

    scan: PatientScan
    key: str
    fingerprint: str
    folder: str
    manual_centres: dict[str, tuple[float, float, float]]
    cache_file: Path


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _process_patient(
    scan: PatientScan,
    key: str,
    settings: PreprocessSettings,
    manual_centres: dict[str, tuple[float, float, float]],
    where: str,
) -> _PatientResult:
    """Volumes -> femoral heads -> crops -> CT pairs for one patient; data problems go to the result.

    Args:
        scan: the patient's series found by ``scan_site``.
        key: the patient's pseudonym.
        settings: protocols, crop grid, CT window, anchor protocol.
        manual_centres: side -> femoral-head centre (LPS mm) from labels.csv; overrides localisation.
        where: the patient's folder (relative to the site), for problem lines.
    """
    problems = ProblemLog()
    grid = settings.grid
    empty = np.zeros((0, grid.size, grid.size), np.float32)
    result = _PatientResult(key, {}, {}, {}, {}, empty, empty.copy(), problems)
    wanted = set(settings.protocols) | {settings.anchor_protocol}
    volumes: dict[str, Volume] = {}
    for protocol, series in scan.series.items():
        if protocol == "CT" or protocol not in wanted:
            continue
        volume = load_volume(series, problems)
        if volume is not None:
            volumes[protocol] = volume
    anchor = volumes.get(settings.anchor_protocol)
    if anchor is None:
        anchor = next((v for v in volumes.values() if v.orientation == "COR"), None)
    heads = {}
    if anchor is not None and len(manual_centres) < len(SIDES):
        try:
            heads = localize_femoral_heads(anchor)
        except LocalizationError as exc:
            problems.add(
                where,
                f"femoral heads not found on the coronal MR ({exc})",
                "give the centres in labels.csv (fh_x_mm, fh_y_mm, fh_z_mm)",
            )
    elif anchor is None and len(manual_centres) < len(SIDES):
        found = ", ".join(sorted(volumes)) or "none"
        problems.add(
            where,
            f"no coronal MR series to localise the femoral heads (protocols loaded: {found})",
            f"export a coronal T1 series ({settings.anchor_protocol}), or give the centres in labels.csv",
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
            if volumes:
                problems.add(
                    where,
                    f"{side} hip: no protocol covers the femoral head; hip skipped",
                    "check that the series cover both hips, or the centre given in labels.csv",
                )
            continue
        result.centres[side] = np.asarray(centre, np.float64)
        result.images[side] = crops.image
        result.available[side] = crops.available
        result.confidence[side] = confidence
    if "CT" in scan.series and result.centres:
        _pair_with_ct(scan, volumes, anchor, settings, where, result)
    return result


def _pair_with_ct(
    scan: PatientScan,
    volumes: dict[str, Volume],
    anchor: Volume | None,
    settings: PreprocessSettings,
    where: str,
    result: _PatientResult,
) -> None:
    """Register the patient's CT to the anchor MR and cut MR/CT slice pairs into ``result``."""
    problems = result.problems
    ct = load_volume(scan.series["CT"], problems)
    if ct is None:
        return
    if anchor is None:
        problems.add(where, "CT not paired: no coronal MR to register it to", "export a coronal T1 series")
        return
    try:
        registration = register_rigid(anchor, ct, centres_mm=list(result.centres.values()))
    except ValueError as exc:
        problems.add(
            scan.series["CT"].relpath(),
            f"CT not paired: registration to the MR failed ({_first_line(exc)})",
            "check that the CT covers the hips",
        )
        return
    mr_parts, ct_parts = [], []
    for side, centre in result.centres.items():
        mr, ct_slices = ct_pairs_for_hip(volumes, ct, registration.matrix, centre, side, settings)
        mr_parts.append(mr)
        ct_parts.append(ct_slices)
    result.pairs_mr = np.concatenate(mr_parts).astype(np.float32)
    result.pairs_ct = np.concatenate(ct_parts).astype(np.float32)
    result.registration = np.asarray(registration.matrix, np.float64)
    if len(result.pairs_mr) == 0:
        problems.add(
            scan.series["CT"].relpath(),
            "CT not paired: after registration the CT does not cover the hip boxes",
            "check that the CT and MR show the same hips",
        )


def _process_patient_safely(
    scan: PatientScan,
    key: str,
    settings: PreprocessSettings,
    manual_centres: dict[str, tuple[float, float, float]],
    where: str,
) -> _PatientResult:
    """:func:`_process_patient`, turning any unexpected exception into a problem for this patient."""
    try:
        return _process_patient(scan, key, settings, manual_centres, where)
    except Exception as exc:  # noqa: BLE001 - one patient's failure must not stop the site
        return _failed(key, settings, where, exc)


def _failed(key: str, settings: PreprocessSettings, where: str, exc: BaseException) -> _PatientResult:
    grid = settings.grid
    empty = np.zeros((0, grid.size, grid.size), np.float32)
    problems = ProblemLog()
    problems.add(
        where,
        f"preprocessing failed ({type(exc).__name__}: {_first_line(exc)}); patient skipped",
        "check this study's series (re-export from PACS); if it persists, report this line to the "
        "onfh maintainers",
        "error",
    )
    return _PatientResult(key, {}, {}, {}, {}, empty, empty.copy(), problems, failed=True)


def _worker_init(threads: int) -> None:
    """Keep parallel workers from oversubscribing the cores with their own thread pools."""
    import torch

    torch.set_num_threads(threads)


def load_site(
    site_dir: Path,
    cache_dir: Path,
    settings: PreprocessSettings | None = None,
    split_seed: int = 0,
    name: str | None = None,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
) -> SiteData:
    """Build (or reuse from cache) a site's hips and MR/CT pairs.

    Bad data never raises: every problem (file, reason, fix) lands in ``SiteData.problems``, and a
    patient whose processing fails is skipped with an error naming its folder.

    The cache is keyed by the preprocessing settings (one folder per settings fingerprint) and,
    per patient, by the names, sizes and mtimes of the files of its series: a re-run reuses it,
    and a changed or added file re-processes only its patient. Labels are joined after the
    cache, so editing stages in labels.csv never re-processes images.

    Args:
        site_dir: the hospital's export: DICOM anywhere below, ``labels.csv``, optional
            ``protocols.toml``. Only read.
        cache_dir: where preprocessed patients are kept (site-local, never shared); must lie
            outside ``site_dir``.
        settings: preprocessing settings (default ``PreprocessSettings()``).
        split_seed: seed of the train/val/test split by patient.
        name: the site's name (default: the folder's name).
        workers: processes for the cold path (patients in parallel).
        progress: called with one line per processed patient (no identifiers in it).

    Returns:
        The :class:`SiteData`.

    Raises:
        ValueError: ``site_dir`` is not a folder, or ``cache_dir`` lies inside it (the message
            names the folder and the fix).
        OSError: ``cache_dir`` cannot be written.
    """
    site_dir, cache_dir = Path(site_dir).absolute(), Path(cache_dir).absolute()
    settings = settings or PreprocessSettings()
    if not site_dir.is_dir():
        raise ValueError(f"site folder {site_dir} does not exist: pass the folder holding the DICOM export")
    if cache_dir.resolve().is_relative_to(site_dir.resolve()):
        raise ValueError(
            f"cache folder {cache_dir} is inside the site folder {site_dir}, which is only read: "
            "pass a cache folder outside it"
        )
    site_name = name or site_dir.name
    salt = _salt(cache_dir)
    bucket = cache_dir / f"v{CACHE_VERSION}-{settings.fingerprint()}-{preprocessing_code_fingerprint()}"
    bucket.mkdir(parents=True, exist_ok=True)
    files = _SiteFiles(site_dir, salt)
    problems = ProblemLog()
    labels = read_labels(site_dir / LABELS_FILE, problems)
    manual = _manual_centres(labels)
    manual_by_key = {patient_key(pid, salt): centres for pid, centres in manual.items()}
    site_fp = files.dicom_fingerprint(json.dumps(sorted(manual_by_key.items()), sort_keys=True))

    cached = _read_site_cache(bucket, site_fp)
    if cached is None:
        index, arrays = _build(site_dir, bucket, settings, salt, files, manual, workers, progress, site_name)
        if index.pop("complete"):
            _write_atomic(bucket / "site.npz", _npz_bytes(**arrays))
            _write_atomic(bucket / "site.json", json.dumps({**index, "fingerprint": site_fp}).encode())
    else:
        index, arrays = cached
    problems.extend(files.show_problem(p) for p in index["problems"])
    return _assemble(site_name, settings, split_seed, salt, files, index, arrays, labels, problems)


def _manual_centres(labels: list[HipLabel]) -> dict[str, dict[str, tuple[float, float, float]]]:
    manual: dict[str, dict[str, tuple[float, float, float]]] = {}
    for label in labels:
        if label.centre_mm is not None:
            manual.setdefault(label.patient_id, {})[label.side] = tuple(label.centre_mm)
    return manual


def _read_site_cache(bucket: Path, site_fp: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """The whole-site cache when it matches ``site_fp``; None when absent, stale or damaged."""
    try:
        index = json.loads((bucket / "site.json").read_text())
        if index.get("fingerprint") != site_fp:
            return None
        with np.load(bucket / "site.npz") as data:
            arrays = {k: data[k] for k in data.files}
        return index, arrays
    except Exception:  # noqa: BLE001 - a damaged cache (bad JSON, bad zip) is rebuilt, never fatal
        return None


def _build(
    site_dir: Path,
    bucket: Path,
    settings: PreprocessSettings,
    salt: bytes,
    files: _SiteFiles,
    manual: dict[str, dict[str, tuple[float, float, float]]],
    workers: int,
    progress: Callable[[str], None] | None,
    site_name: str,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Scan the folder and preprocess the patients not cached yet; returns (index, arrays).

    The index holds only pseudonymous keys, counts, and problems with paths replaced by tokens.
    """
    problems = ProblemLog()
    try:
        scan = scan_site(site_dir, None, problems)
        patients, scan_counts = (
            scan.patients,
            {
                "files": scan.n_files,
                "dicom_files": scan.n_dicom,
                "ignored_files": scan.ignored,
            },
        )
    except Exception as exc:  # noqa: BLE001 - an unforeseen reader failure is reported, not raised
        problems.add(
            ".", f"scanning the folder failed ({type(exc).__name__}: {_first_line(exc)})", "report this"
        )
        patients, scan_counts = {}, {"files": len(files.stats), "dicom_files": 0, "ignored_files": 0}
    identifiers = list(patients)
    if not patients:
        problems.add(
            ".",
            f"no usable MR or CT series found ({scan_counts['files']} files, {scan_counts['dicom_files']} DICOM)",
            "point the check at the folder holding the PACS export (DICOM files anywhere below it)",
            "error",
        )

    jobs: list[_Job] = []
    for pid, patient in patients.items():
        key = patient_key(pid, salt)
        series_files = {
            protocol: sorted(files.rel(f) for f in series.files)
            for protocol, series in patient.series.items()
        }
        all_files = [f for names in series_files.values() for f in names]
        folder = _study_place(patient, all_files, files, settings.anchor_protocol)
        centres = manual.get(pid, {})
        extra = json.dumps({"series": series_files, "centres": centres}, sort_keys=True)
        fingerprint = files.fingerprint(all_files, extra)
        cache_file = bucket / f"patient-{key}-{fingerprint}.npz"
        jobs.append(_Job(patient, key, fingerprint, folder, centres, cache_file))

    results: dict[str, _PatientResult] = {}
    todo: list[_Job] = []
    for job in jobs:
        cached = _read_patient(job.cache_file, job.key, files) if job.cache_file.exists() else None
        if cached is None:
            todo.append(job)
        else:
            results[job.key] = cached
    for job, result in _run_jobs(todo, settings, workers, progress, site_name):
        results[job.key] = result
        if not result.failed:
            _write_atomic(job.cache_file, _patient_bytes(result, files, identifiers))
    _prune(bucket, {job.cache_file.name for job in jobs})

    for job in jobs:  # results in scan order, problems too
        problems.extend(results[job.key].problems)
    complete = not any(r.failed for r in results.values())
    arrays = _stack(jobs, results, settings)
    pid_of = {job.key: pid for pid, job in zip(patients, jobs, strict=True)}
    summaries = [
        {
            "key": job.key,
            "split_id": split_id(pid_of[job.key]),
            "folder": files.hide(job.folder, identifiers),
            "protocols": job.scan.protocols(),
            "has_ct": job.scan.has_ct,
            "studies": len(job.scan.study_uids),
            "hips": [s for s in SIDES if s in results[job.key].images],
            "pairs": int(len(results[job.key].pairs_mr)),
        }
        for job in jobs
    ]
    index = {
        "version": CACHE_VERSION,
        "scan": scan_counts,
        "patients": summaries,
        "problems": [files.hide_problem(p, identifiers) for p in problems],
        "complete": complete,
    }
    return index, arrays


def _study_place(patient: PatientScan, all_files: list[str], files: _SiteFiles, anchor: str) -> str:
    """Where a hospital finds a patient's study: the folder common to its series, or (files of
    many patients side by side) one file of its anchor series."""
    folder = os.path.commonpath(all_files) if all_files else ""
    if folder in files.stats:  # the patient has a single file
        folder = os.path.dirname(folder)
    if folder:
        return folder
    series = patient.series.get(anchor) or next(iter(patient.series.values()), None)
    return series.relpath() if series is not None else "."


def _run_jobs(
    todo: list[_Job],
    settings: PreprocessSettings,
    workers: int,
    progress: Callable[[str], None] | None,
    site_name: str,
) -> Iterable[tuple[_Job, _PatientResult]]:
    """Process patients serially or in ``workers`` processes, reporting each one as it ends."""
    started = time.perf_counter()

    def report(done: int, job: _Job, result: _PatientResult) -> None:
        if progress is not None:
            hips = len(result.images)
            pairs = len(result.pairs_mr)
            status = "FAILED" if result.failed else f"{hips} hips, {pairs} pairs"
            progress(
                f"{site_name}: patient {done}/{len(todo)} ({job.key[:8]}) preprocessed: {status} "
                f"[{time.perf_counter() - started:.0f}s]"
            )

    if workers <= 1 or len(todo) <= 1:
        for done, job in enumerate(todo, 1):
            result = _process_patient_safely(job.scan, job.key, settings, job.manual_centres, job.folder)
            report(done, job, result)
            yield job, result
        return
    workers = min(workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: the parent may hold torch/OpenMP thread pools that a forked child inherits broken.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(threads,)
    ) as pool:
        futures = {
            pool.submit(
                _process_patient_safely, job.scan, job.key, settings, job.manual_centres, job.folder
            ): job
            for job in todo
        }
        for done, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - a crashed worker loses one patient, not the site
                result = _failed(job.key, settings, job.folder, exc)
            report(done, job, result)
            yield job, result


def _prune(bucket: Path, keep: set[str]) -> None:
    """Delete patient cache files no longer matching any patient (changed or removed files)."""
    for path in bucket.glob("patient-*.npz"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def _stack(jobs: list[_Job], results: dict[str, _PatientResult], settings: PreprocessSettings) -> dict:
    """Per-patient results -> the site's aligned arrays (float16 on disk to halve the cache)."""
    grid = settings.grid
    n_protocols = len(settings.protocols)
    hip_keys, hip_sides, images, available, confidence, centres = [], [], [], [], [], []
    pair_mr, pair_ct, pair_keys, reg_keys, reg_matrices = [], [], [], [], []
    for job in jobs:
        result = results[job.key]
        for side in SIDES:
            if side in result.images:
                hip_keys.append(result.key)
                hip_sides.append(side)
                images.append(result.images[side])
                available.append(result.available[side])
                confidence.append(result.confidence[side])
                centres.append(result.centres[side])
        pair_mr.append(result.pairs_mr)
        pair_ct.append(result.pairs_ct)
        pair_keys.extend([result.key] * len(result.pairs_mr))
        if result.registration is not None:
            reg_keys.append(result.key)
            reg_matrices.append(result.registration)
    image_shape = (n_protocols, grid.slices, grid.size, grid.size)
    slice_shape = (0, grid.size, grid.size)
    return {
        "patient_keys": np.array(hip_keys, dtype=f"U{KEY_LENGTH}"),
        "sides": np.array(hip_sides, dtype="U1"),
        "images": np.stack(images).astype(np.float16) if images else np.zeros((0, *image_shape), np.float16),
        "available": np.array(available, dtype=bool).reshape(-1, n_protocols),
        "confidence": np.array(confidence, dtype=np.float32),
        "centres": np.array(centres, dtype=np.float64).reshape(-1, 3),
        "pairs_mr": np.concatenate(pair_mr).astype(np.float16)
        if pair_mr
        else np.zeros(slice_shape, np.float16),
        "pairs_ct": np.concatenate(pair_ct).astype(np.float16)
        if pair_ct
        else np.zeros(slice_shape, np.float16),
        "pair_keys": np.array(pair_keys, dtype=f"U{KEY_LENGTH}"),
        "registration_keys": np.array(reg_keys, dtype=f"U{KEY_LENGTH}"),
        "registration": np.array(reg_matrices, dtype=np.float64).reshape(-1, 4, 4),
    }


def _assemble(
    site_name: str,
    settings: PreprocessSettings,
    split_seed: int,
    salt: bytes,
    files: _SiteFiles,
    index: dict,
    arrays: dict[str, np.ndarray],
    labels: list[HipLabel],
    problems: ProblemLog,
) -> SiteData:
    """Join labels (by salted key, reporting rows by line) and split the patients."""
    keys = [str(k) for k in arrays["patient_keys"]]
    sides = [str(s) for s in arrays["sides"]]
    hips_of = {p["key"]: set(p["hips"]) for p in index["patients"]}
    stage_of: dict[tuple[str, str], int] = {}
    labelled_patients = set()
    for label in labels:
        key = patient_key(label.patient_id, salt)
        labelled_patients.add(key)
        where = f"labels.csv:{label.line}"
        if key not in hips_of:
            problems.add(
                where,
                "patient_id matches no study in the DICOM folder; label not used",
                "check the patient_id against the PatientID of the DICOM export, or add the study",
            )
        elif label.side not in hips_of[key]:
            if label.stage is not None:
                problems.add(
                    where,
                    f"the study has no usable {label.side} hip (see the study's problems); label not used",
                    "fix the study's series, or give the centre in fh_x_mm, fh_y_mm, fh_z_mm",
                )
        elif label.stage is not None:
            stage_of[(key, label.side)] = label.stage
    unlabelled_patients = [k for k in hips_of if k not in labelled_patients]
    if labels and unlabelled_patients:
        problems.add(
            "labels.csv",
            f"{len(unlabelled_patients)} of {len(hips_of)} patients have no label row; their hips are unlabelled",
            "nothing to do if intended (usable for pretraining); otherwise add rows",
            "info",
        )
    label_values = np.array([stage_of.get((k, s), -1) for k, s in zip(keys, sides, strict=True)], np.int64)
    stages = np.where(label_values > 0, label_values, 0)
    healthy = label_values == 0
    pair_keys = [str(k) for k in arrays["pair_keys"]]
    split_of = {p["key"]: p["split_id"] for p in index["patients"]}
    # Small sites: every split gets labelled patients, MR-CT pairs and, where three patients
    # have it, each stage, so that a test set can score all four stages.
    staged = {
        stage: {split_of[k] for k, s in zip(keys, stages, strict=True) if s == stage} for stage in STAGES
    }
    by_split_id = split_patients(
        sorted(split_of.values()),
        seed=split_seed,
        groups={
            "labelled": set().union(*staged.values()),
            "with MR-CT pairs": {split_of[k] for k in pair_keys},
            **{f"stage {stage}": members for stage, members in staged.items()},
        },
    )
    split = {key: by_split_id[sid] for key, sid in split_of.items()}
    available = arrays["available"].astype(bool)
    confidence = arrays["confidence"].astype(np.float32)
    patients = [
        PatientSummary(
            key=p["key"],
            folder=files.show(p["folder"]),
            protocols=tuple(p["protocols"]),
            has_ct=bool(p["has_ct"]),
            hips=tuple(p["hips"]),
            pairs=int(p["pairs"]),
        )
        for p in index["patients"]
    ]
    stats = {
        **index["scan"],
        "patients": len(patients),
        "studies": int(sum(p["studies"] for p in index["patients"])),
        "hips": len(keys),
        "labelled_hips": int((stages > 0).sum()),
        "stage_hips": {int(s): int((stages == s).sum()) for s in STAGES},
        "healthy_hips": int(healthy.sum()),
        "unlabelled_hips": int((label_values < 0).sum()),
        "patients_with_ct": int(sum(p.has_ct for p in patients)),
        "patients_with_ct_pairs": int(sum(p.pairs > 0 for p in patients)),
        "pairs": len(pair_keys),
        "protocol_hips": {p: int(available[:, i].sum()) for i, p in enumerate(settings.protocols)},
        "protocol_patients": {p: int(sum(p in s.protocols for s in patients)) for p in settings.protocols},
        "low_confidence_hips": int((confidence < LOW_CONFIDENCE).sum()),
    }
    registration = {
        str(k): m for k, m in zip(arrays["registration_keys"], arrays["registration"], strict=True)
    }
    return SiteData(
        name=site_name,
        protocols=tuple(settings.protocols),
        patient_keys=np.array(keys, dtype=f"U{KEY_LENGTH}"),
        sides=np.array(sides, dtype="U1"),
        images=arrays["images"].astype(np.float32),
        available=available,
        stages=stages,
        confidence=confidence,
        pairs_mr=arrays["pairs_mr"].astype(np.float32),
        pairs_ct=arrays["pairs_ct"].astype(np.float32),
        pair_keys=np.array(pair_keys, dtype=f"U{KEY_LENGTH}"),
        split=split,
        problems=problems,
        stats=stats,
        centres=arrays["centres"].astype(np.float64),
        healthy=healthy,
        registration=registration,
        patients=patients,
    )


def _patient_bytes(result: _PatientResult, files: _SiteFiles, identifiers: list[str]) -> bytes:
    sides = [s for s in SIDES if s in result.images]
    cached_problems = [files.hide_problem(p, identifiers) for p in result.problems]
    return _npz_bytes(
        sides=np.array(sides, dtype="U1"),
        images=np.stack([result.images[s] for s in sides]) if sides else np.zeros((0,), np.float32),
        available=np.stack([result.available[s] for s in sides]) if sides else np.zeros((0,), bool),
        centres=np.stack([result.centres[s] for s in sides]) if sides else np.zeros((0, 3)),
        confidence=np.array([result.confidence[s] for s in sides], dtype=np.float32),
        pairs_mr=result.pairs_mr,
        pairs_ct=result.pairs_ct,
        problems=np.array(json.dumps(cached_problems)),
        registration=result.registration if result.registration is not None else np.zeros((0, 4, 4)),
    )


def _read_patient(path: Path, key: str, files: _SiteFiles) -> _PatientResult | None:
    """A cached patient, or None when the file is damaged (it is then re-processed)."""
    try:
        with np.load(path) as data:
            sides = [str(s) for s in data["sides"]]
            registration = data["registration"]
            return _PatientResult(
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
