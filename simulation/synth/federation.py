"""``onfh synth OUT``: write synthetic hospitals as DICOM + labels CSV, ground truth beside.

``generate_federation`` plans every site, writes their patients in a process pool, then each
site's labels.csv and truth and the manifest.

Layout (docs/phantom.md, "Output")::

    OUT/federation.json        parameters, per-site summary
    OUT/site-NN/               a site's data folder: DICOM (site-specific folder style) + labels.csv
    OUT/site-NN.truth.json     ground truth, outside the site folder

``onfh synth --sites 4 --patients 30 --seed 0 OUT`` runs ``main``. docs/phantom.md describes the
sites, the protocols and the anatomy.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

from common.progress import progress_bar
from simulation.phantom.difficulty import Difficulty, add_difficulty_option, difficulty_named
from simulation.synth.patient import patient_job
from simulation.synth.plan import NAMING_SCHEMES, SIZES, SiteProfile, make_site, plan_patients

GENERATOR_VERSION = 3  # 3: lesion tissue clear of the subchondral plate; difficulty knobs


def _site_counts(sites: int, patients: int, size_skew: float) -> list[int]:
    """Patients per site: ``patients`` each, or linearly skewed by ``size_skew`` (0-0.9)."""
    if sites == 1 or size_skew == 0:
        return [patients] * sites
    return [
        max(2, int(round(patients * (1.0 + size_skew * (2.0 * i / (sites - 1) - 1.0))))) for i in range(sites)
    ]


def _parameters(
    sites: int, patients: int, seed: int, size: str, size_skew: float, difficulty: Difficulty
) -> dict:
    return {
        "difficulty": difficulty.to_json(),
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sites": sites,
        "patients": patients,
        "size": size,
        "size_skew": size_skew,
    }


def _is_complete(out_dir: Path, parameters: dict) -> bool:
    manifest = out_dir / "federation.json"
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(data.get("complete")) and data.get("parameters") == parameters


def generate_federation(
    out_dir: Path,
    sites: int = 4,
    patients: int = 30,
    seed: int = 0,
    size: str = "default",
    workers: int | None = None,
    size_skew: float = 0.0,
    difficulty: Difficulty | str = "easy",
) -> Path:
    """Write ``sites`` synthetic hospitals with ``patients`` each under ``out_dir``; return ``out_dir``.

    A folder that already holds a complete federation with the same parameters is reused as is.
    A folder holding an incomplete or different federation written by this generator is
    regenerated; any other non-empty folder is refused.

    Args:
        out_dir: output folder (created).
        sites, patients: federation size; ``size_skew`` in [0, 0.9] spreads patient counts
            linearly from ``patients*(1-skew)`` (site-00) to ``patients*(1+skew)`` (last site).
        seed: everything (anatomy, stages, noise, identifiers, UIDs) follows from it.
        size: ``"default"`` (realistic resolutions) or ``"tiny"`` (coarse, for tests).
        workers: processes (default: CPU count); 1 renders in this process.
        difficulty: how hard staging is (``simulation.phantom.difficulty``): a preset name
            (``"easy"``, ``"clinical"``) or the knobs themselves.
    """
    out_dir = Path(out_dir)
    _check_arguments(sites, patients, size, size_skew)
    if isinstance(difficulty, str):
        difficulty = difficulty_named(difficulty)
    parameters = _parameters(sites, patients, seed, size, size_skew, difficulty)
    if _is_complete(out_dir, parameters):
        print(f"synth: {out_dir} already holds this federation; reusing it", flush=True)
        return out_dir
    _prepare_folder(out_dir)
    start = time.perf_counter()
    (out_dir / "federation.json").write_text(
        json.dumps({"parameters": parameters, "complete": False}, indent=2)
    )
    counts = _site_counts(sites, patients, size_skew)
    profiles = [make_site(i, seed, counts[i], size, difficulty) for i in range(sites)]
    results = _write_patients(out_dir, profiles, seed, size, workers, start)
    manifest = _write_manifest(out_dir, profiles, results, parameters, start)
    print(
        f"synth: wrote {sites} sites, {manifest['files']} files, {manifest['bytes'] / 1e6:.0f} MB "
        f"in {manifest['seconds']} s -> {out_dir}",
        flush=True,
    )
    return out_dir


def _check_arguments(sites: int, patients: int, size: str, size_skew: float) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if sites < 1 or patients < 1:
        raise ValueError(f"need at least one site and one patient, got sites={sites}, patients={patients}")
    if not 0.0 <= size_skew <= 0.9:
        raise ValueError(f"size_skew must be in [0, 0.9], got {size_skew}")


def _write_patients(
    out_dir: Path, profiles: list[SiteProfile], seed: int, size: str, workers: int | None, start: float
) -> dict[int, dict[int, dict]]:
    """Every site's patients (in a process pool unless ``workers`` is 1): site -> patient -> result."""
    plans = {p.index: plan_patients(p, seed) for p in profiles}
    jobs = [(out_dir / p.name, p, plan, seed, size) for p in profiles for plan in plans[p.index]]
    results: dict[int, dict[int, dict]] = {p.index: {} for p in profiles}
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with progress_bar("synth: patients", len(jobs)) as bar:

        def collect(site_index: int, patient_index: int, result: dict) -> None:
            results[site_index][patient_index] = result
            bar.advance()
            profile = profiles[site_index]
            if len(results[site_index]) == profile.patients:
                done = results[site_index].values()
                megabytes = sum(r["bytes"] for r in done) / 1e6
                print(
                    f"synth: {profile.name}: {profile.patients} patients, "
                    f"{sum(r['files'] for r in done)} files, {megabytes:.0f} MB "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )

        if workers == 1:
            for job in jobs:
                collect(*patient_job(job))
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                for future in as_completed([pool.submit(patient_job, job) for job in jobs]):
                    collect(*future.result())
    return results


def _write_manifest(
    out_dir: Path,
    profiles: list[SiteProfile],
    results: dict[int, dict[int, dict]],
    parameters: dict,
    start: float,
) -> dict:
    """Each site's labels.csv and truth, then the complete federation.json; returns the manifest."""
    summary = []
    for profile in profiles:
        site_results = [results[profile.index][i] for i in range(profile.patients)]
        _write_labels(out_dir / profile.name / "labels.csv", site_results)
        truth = [r["truth"] for r in site_results]
        (out_dir / f"{profile.name}.truth.json").write_text(json.dumps(truth, indent=1))
        summary.append(_site_summary(profile, site_results))
    manifest = {
        "parameters": parameters,
        "complete": True,
        "generator": "simulation.synth (onfh synth)",
        "seconds": round(time.perf_counter() - start, 1),
        "bytes": sum(s["bytes"] for s in summary),
        "files": sum(s["files"] for s in summary),
        "sites": summary,
    }
    (out_dir / "federation.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _prepare_folder(out_dir: Path) -> None:
    """Make ``out_dir`` ready: create it, or clear a previous run of this generator."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file; give a folder for the synthetic federation")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list(out_dir.iterdir())
    if not entries:
        return
    if not (out_dir / "federation.json").is_file():
        raise ValueError(
            f"{out_dir} is not empty and holds no federation.json from `onfh synth`; "
            "give an empty or new folder so nothing of yours is overwritten"
        )
    for entry in entries:
        if entry.is_dir() and re.fullmatch(r"site-\d+", entry.name):
            shutil.rmtree(entry)
        elif entry.name.endswith(".truth.json") or entry.name == "federation.json":
            entry.unlink()


def _write_labels(path: Path, results: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["patient_id", "side", "arco_stage"])
        writer.writeheader()
        for result in results:
            writer.writerows(result["labels"])


def _site_summary(profile: SiteProfile, results: list[dict]) -> dict:
    stages = [h["stage"] for r in results for h in r["truth"]["hips"].values()]
    info = asdict(profile)
    info.update(
        {
            "files": sum(r["files"] for r in results),
            "bytes": sum(r["bytes"] for r in results),
            "with_ct": sum(r["truth"]["has_ct"] for r in results),
            "hips_per_stage": {str(s): stages.count(s) for s in range(5)},
            "labelled_hips": sum(1 for r in results for row in r["labels"] if row["arco_stage"]),
            "series_descriptions": NAMING_SCHEMES[profile.naming],
        }
    )
    return info


def main(argv: list[str] | None = None) -> int:
    """``onfh synth [--sites N] [--patients N] [--seed S] [--size default|tiny] OUT``."""
    parser = argparse.ArgumentParser(
        prog="onfh synth", description="Write synthetic hospitals as DICOM + labels.csv (+ truth beside)."
    )
    parser.add_argument("out", type=Path, help="output folder (new, empty, or an earlier onfh synth output)")
    parser.add_argument("--sites", type=int, default=4, help="hospitals (default: 4)")
    parser.add_argument("--patients", type=int, default=30, help="patients per site")
    parser.add_argument("--seed", type=int, default=0, help="everything follows from it (default: 0)")
    parser.add_argument(
        "--size", choices=SIZES, default="default", help="'tiny' = coarse and fast, for tests"
    )
    parser.add_argument(
        "--size-skew", type=float, default=0.0, help="0-0.9: spread patient counts across sites"
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    add_difficulty_option(parser)
    parser.add_argument(
        "--mr-lesion-contrast",
        type=float,
        default=None,
        help="0-1: MR contrast of lesion tissue against marrow (CT unchanged); overrides the preset's",
    )
    parser.add_argument(
        "--lesion-blind-ct",
        action="store_true",
        help="CT shows lesion tissue as marrow, MR unchanged: the pretraining control (docs/phantom.md)",
    )
    args = parser.parse_args(argv)
    try:
        difficulty = difficulty_named(
            args.difficulty,
            mr_lesion_contrast=args.mr_lesion_contrast,
            ct_shows_lesions=False if args.lesion_blind_ct else None,
        )
        generate_federation(
            args.out,
            args.sites,
            args.patients,
            args.seed,
            args.size,
            args.workers,
            args.size_skew,
            difficulty,
        )
    except ValueError as exc:
        print(f"onfh synth: {exc}", file=sys.stderr)
        return 2
    return 0
