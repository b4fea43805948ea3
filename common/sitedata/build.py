"""The cold path of a site load: scan the folder, preprocess the patients not cached yet, index the site."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.problems import ProblemLog, first_line
from common.progress import progress_bar
from common.sitedata import cache
from common.sitedata.assemble import stack
from common.sitedata.dicom import PatientScan, scan_site
from common.sitedata.patient import SIDES, PatientResult
from common.sitedata.pool import PatientJob, run_jobs
from common.sitedata.privacy import SiteFiles, patient_key, split_id
from common.sitedata.settings import PreprocessSettings

Centres = dict[str, tuple[float, float, float]]  # side -> femoral-head centre, LPS mm


def build_site(
    site_dir: Path,
    bucket: Path,
    settings: PreprocessSettings,
    files: SiteFiles,
    manual: dict[str, Centres],
    workers: int,
    progress: Callable[[str], None] | None,
    site_name: str,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Scan the folder and preprocess the patients not cached yet; returns (index, arrays).

    The index holds only pseudonymous keys, counts, and problems with paths replaced by tokens;
    its ``complete`` is False when a patient failed unexpectedly (the site is then not cached).
    """
    problems = ProblemLog()
    patients, scan_counts = _scan(site_dir, files, problems)
    identifiers = list(patients)
    jobs = [
        _job(pid, patient, files, manual.get(pid, {}), bucket, settings) for pid, patient in patients.items()
    ]
    results = _preprocess(jobs, files, identifiers, settings, workers, progress, site_name)
    cache.prune(bucket, {job.cache_file.name for job in jobs})

    for job in jobs:  # results in scan order, problems too
        problems.extend(results[job.key].problems)
    arrays = stack([results[job.key] for job in jobs], settings)
    summaries = [
        {
            "key": job.key,
            "split_id": split_id(pid),
            "folder": files.hide(job.folder, identifiers),
            "protocols": job.scan.protocols(),
            "has_ct": job.scan.has_ct,
            "studies": len(job.scan.study_uids),
            "hips": [s for s in SIDES if s in results[job.key].images],
            "pairs": int(len(results[job.key].pairs_mr)),
        }
        for pid, job in zip(patients, jobs, strict=True)
    ]
    index = {
        "version": cache.CACHE_VERSION,
        "scan": scan_counts,
        "patients": summaries,
        "problems": [files.hide_problem(p, identifiers) for p in problems],
        "complete": not any(r.failed for r in results.values()),
    }
    return index, arrays


def _scan(site_dir: Path, files: SiteFiles, problems: ProblemLog) -> tuple[dict[str, PatientScan], dict]:
    """The patients found (by PatientID) and the file counts; a failing scan is a problem, not a raise."""
    try:
        scan = scan_site(site_dir, None, problems)
        patients = scan.patients
        scan_counts = {"files": scan.n_files, "dicom_files": scan.n_dicom, "ignored_files": scan.ignored}
    except Exception as exc:  # noqa: BLE001 - an unforeseen reader failure is reported, not raised
        problems.add(
            ".", f"scanning the folder failed ({type(exc).__name__}: {first_line(exc)})", "report this"
        )
        patients, scan_counts = {}, {"files": len(files.stats), "dicom_files": 0, "ignored_files": 0}
    if not patients:
        problems.add(
            ".",
            f"no usable MR or CT series found ({scan_counts['files']} files, {scan_counts['dicom_files']} DICOM)",
            "point the check at the folder holding the PACS export (DICOM files anywhere below it)",
            "error",
        )
    return patients, scan_counts


def _job(
    pid: str,
    patient: PatientScan,
    files: SiteFiles,
    centres: Centres,
    bucket: Path,
    settings: PreprocessSettings,
) -> PatientJob:
    """One patient's job: its key, and its cache file named by the state of its series' files."""
    key = patient_key(pid, files.salt)
    series_files = {
        protocol: sorted(files.rel(f) for f in series.files) for protocol, series in patient.series.items()
    }
    all_files = [f for names in series_files.values() for f in names]
    folder = _study_place(patient, all_files, files, settings.anchor_protocol)
    extra = json.dumps({"series": series_files, "centres": centres}, sort_keys=True)
    fingerprint = cache.files_fingerprint(files, all_files, extra)
    return PatientJob(
        patient, key, fingerprint, folder, centres, cache.patient_file(bucket, key, fingerprint)
    )


def _preprocess(
    jobs: list[PatientJob],
    files: SiteFiles,
    identifiers: list[str],
    settings: PreprocessSettings,
    workers: int,
    progress: Callable[[str], None] | None,
    site_name: str,
) -> dict[str, PatientResult]:
    """Every job's result: from its cache file when there is one, else preprocessed (and cached)."""
    results: dict[str, PatientResult] = {}
    todo: list[PatientJob] = []
    for job in jobs:
        cached = cache.read_patient(job.cache_file, job.key, files)
        if cached is None:
            todo.append(job)
        else:
            results[job.key] = cached
    if not todo:
        return results
    with progress_bar(f"{site_name}: preprocessing", len(todo)) as bar:
        for job, result in run_jobs(todo, settings, workers, progress, site_name):
            results[job.key] = result
            if not result.failed:  # an unexpected failure is retried on the next load
                cache.write_patient(job.cache_file, result, files, identifiers)
            bar.advance()
    return results


def _study_place(patient: PatientScan, all_files: list[str], files: SiteFiles, anchor: str) -> str:
    """Where a hospital finds a patient's study: the folder common to its series, or (files of
    many patients side by side) one file of its anchor series."""
    folder = os.path.commonpath(all_files) if all_files else ""
    if folder in files.stats:  # the patient has a single file
        folder = os.path.dirname(folder)
    if folder:
        return folder
    series = patient.series.get(anchor) or next(iter(patient.series.values()), None)
    return series.relpath() if series is not None else "."
