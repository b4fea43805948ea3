"""A site's data, ready to train on: hips and MR-CT pairs, built from DICOM once and cached.

``load_site`` is the one entry point the trainers, the ClientApp and ``onfh check`` use:
scan DICOM -> per patient: build volumes, localise both femoral heads, crop every protocol,
register the CT and cut MR/CT slice pairs -> join the labels CSV -> split by patient.

The cache (under ``cache_dir``) never stores a patient identifier: patients are keyed by a
salted hash whose salt stays in the cache folder, and file paths in cached problem lines are
replaced by salted tokens that are turned back into paths only when the site is loaded.
Source files are only ever read.

The steps live beside this module: ``build`` (the cold path), ``patient`` and ``pool`` (one
patient's pipeline, many patients), ``cache`` (the files on disk), ``privacy`` (keys, salt,
path tokens) and ``assemble`` (arrays, labels, split, counts); DICOM reading is in ``dicom``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from common.problems import ProblemLog
from common.sitedata import (
    assemble,
    build,
    cache,
    dicom,
    femoral_head,
    hip_crop,
    labels,
    patient,
    pool,
    privacy,
    protocols,
    registration,
    volume,
)
from common.sitedata import settings as settings_module  # a name apart from load_site's `settings`
from common.sitedata.assemble import LOW_CONFIDENCE, join_labels, site_stats, split_site
from common.sitedata.labels import LABELS_FILE, HipLabel, read_labels
from common.sitedata.privacy import KEY_LENGTH, SiteFiles, patient_key, site_salt, split_id
from common.sitedata.settings import PreprocessSettings

__all__ = [
    "LABELS_FILE",
    "LOW_CONFIDENCE",
    "PatientSummary",
    "SiteData",
    "load_site",
    "patient_key",
    "split_id",
]

# Modules whose code decides what a cached hip holds: a change to any of them starts a new cache.
# Module objects, not file names, so that a renamed module fails here instead of going unhashed.
PREPROCESSING_MODULES: tuple[ModuleType, ...] = (
    dicom.model,
    dicom.limits,
    dicom.bounded,
    dicom.header,
    dicom.geometry,
    dicom.series,
    dicom.scan,
    dicom.decode,
    protocols,
    volume,
    femoral_head,
    hip_crop,
    registration,
    patient,
    pool,
    privacy,
    labels,
    assemble,
    cache,
    build,
    settings_module,
    sys.modules[__name__],  # this module: load_site's cache keys and the site index
)


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

    def staging_patients(self, *splits: str) -> np.ndarray:
        """Patient key of each hip of ``staging_set(*splits)``, in the same order."""
        return self.patient_keys[self._in(self.patient_keys, splits) & (self.stages > 0)]

    def pair_set(self, *splits: str) -> tuple[np.ndarray, np.ndarray]:
        """MR/CT slice pairs of patients in the given splits: ``mr (m, H, W)``, ``ct (m, H, W)``."""
        mask = self._in(self.pair_keys, splits)
        return self.pairs_mr[mask], self.pairs_ct[mask]


def load_site(
    site_dir: Path,
    cache_dir: Path,
    settings: PreprocessSettings | None = None,
    split_seed: int = 0,
    name: str | None = None,
    workers: int = 1,
    fractions: tuple[float, ...] = (0.6, 0.2, 0.2),
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
        fractions: shares of patients in train, val and test (run config ``split-fractions``).
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
    salt = site_salt(cache_dir)
    bucket = cache.open_bucket(cache_dir, settings, PREPROCESSING_MODULES)
    files = SiteFiles(site_dir, salt)
    problems = ProblemLog()
    hip_labels = read_labels(site_dir / LABELS_FILE, problems)
    manual = _manual_centres(hip_labels)
    manual_by_key = {patient_key(pid, salt): centres for pid, centres in manual.items()}
    site_fp = cache.dicom_fingerprint(files, json.dumps(sorted(manual_by_key.items()), sort_keys=True))

    cached = cache.read_site(bucket, site_fp)
    if cached is None:
        index, arrays = build.build_site(
            site_dir, bucket, settings, files, manual, workers, progress, site_name
        )
        if index.pop("complete"):
            cache.write_site(bucket, index, arrays, site_fp)
    else:
        index, arrays = cached
    problems.extend(files.show_problem(p) for p in index["problems"])
    split = (split_seed, tuple(fractions))
    return _assemble(site_name, settings, split, salt, files, index, arrays, hip_labels, problems)


def _manual_centres(hip_labels: list[HipLabel]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """PatientID -> side -> the femoral-head centre given in labels.csv (LPS mm)."""
    manual: dict[str, dict[str, tuple[float, float, float]]] = {}
    for label in hip_labels:
        if label.centre_mm is not None:
            manual.setdefault(label.patient_id, {})[label.side] = tuple(label.centre_mm)
    return manual


def _assemble(
    site_name: str,
    settings: PreprocessSettings,
    split: tuple[int, tuple[float, ...]],
    salt: bytes,
    files: SiteFiles,
    index: dict,
    arrays: dict[str, np.ndarray],
    hip_labels: list[HipLabel],
    problems: ProblemLog,
) -> SiteData:
    """Join labels (by salted key, reporting rows by line) and split the patients."""
    keys = [str(k) for k in arrays["patient_keys"]]
    sides = [str(s) for s in arrays["sides"]]
    hips_of = {p["key"]: set(p["hips"]) for p in index["patients"]}
    stage_of = join_labels(hip_labels, salt, hips_of, problems)
    label_values = np.array([stage_of.get((k, s), -1) for k, s in zip(keys, sides, strict=True)], np.int64)
    stages = np.where(label_values > 0, label_values, 0)
    pair_keys = [str(k) for k in arrays["pair_keys"]]
    split_of = {p["key"]: p["split_id"] for p in index["patients"]}
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
        split=split_site(split_of, keys, stages, pair_keys, *split),
        problems=problems,
        stats=site_stats(index, settings, label_values, available, confidence, len(pair_keys)),
        centres=arrays["centres"].astype(np.float64),
        healthy=label_values == 0,
        registration=registration,
        patients=patients,
    )
