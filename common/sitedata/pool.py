"""Preprocessing many patients, one after the other or in a pool of processes, reporting each as it ends."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from common.sitedata.dicom import PatientScan
from common.sitedata.patient import PatientResult, failed_result, process_patient_safely
from common.sitedata.settings import PreprocessSettings


@dataclass
class PatientJob:
    """One patient to process: its scan, pseudonym, fingerprint and cache file."""

    scan: PatientScan
    key: str
    fingerprint: str
    folder: str
    manual_centres: dict[str, tuple[float, float, float]]
    cache_file: Path


def run_jobs(
    todo: list[PatientJob],
    settings: PreprocessSettings,
    workers: int,
    progress: Callable[[str], None] | None,
    site_name: str,
) -> Iterable[tuple[PatientJob, PatientResult]]:
    """Process patients serially or in ``workers`` processes, reporting each one as it ends."""
    started = time.perf_counter()

    def report(done: int, job: PatientJob, result: PatientResult) -> None:
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
            result = process_patient_safely(job.scan, job.key, settings, job.manual_centres, job.folder)
            report(done, job, result)
            yield job, result
        return
    workers = min(workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: the parent may hold torch/OpenMP thread pools that a forked child inherits broken.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=worker_init, initargs=(threads,)
    ) as pool:
        futures = {
            pool.submit(
                process_patient_safely, job.scan, job.key, settings, job.manual_centres, job.folder
            ): job
            for job in todo
        }
        for done, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - a crashed worker loses one patient, not the site
                result = failed_result(job.key, settings, job.folder, exc)
            report(done, job, result)
            yield job, result


def worker_init(threads: int) -> None:
    """Keep parallel workers from oversubscribing the cores with their own thread pools."""
    import torch

    torch.set_num_threads(threads)
