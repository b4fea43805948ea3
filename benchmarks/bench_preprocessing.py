"""Preprocessing benchmark: time per step per patient (decode, localise, crop, register, pairs) and accuracy.

Runs the steps of ``common.sitedata.patient.process_patient`` one by one on a synthetic federation
written by ``onfh synth`` and compares the femoral-head centres and the MR->CT registration with
the truth files (``OUT/site-NN.truth.json``, outside the site folders).

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_preprocessing --data /tmp/fed_default           # all sites
    .venv/bin/python -m benchmarks.bench_preprocessing --data /tmp/fed_default --quick   # 2 patients / site
    .venv/bin/python -m benchmarks.bench_preprocessing --data /tmp/fed_default --load-site 2
        # also the cold ``load_site`` time of every site with 2 workers (cache in a temp folder)

Without ``--data`` a small federation is synthesised in a temporary folder. Prints one line per
patient, then medians, and writes ``benchmarks/results/preprocessing.json``. Source folders are
only read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import site_dirs, write_json
from common.problems import ProblemLog
from common.sitedata.dicom import load_volume, scan_site
from common.sitedata.femoral_head import LocalizationError, localize_femoral_heads
from common.sitedata.hip_crop import crop_hip_protocols
from common.sitedata.registration import ct_pairs_for_hip, register_rigid
from common.sitedata.settings import PreprocessSettings

STEPS = ("decode", "localise", "crop", "register", "pairs")
NEAR_HEAD_MM = 30.0  # registration error is measured over points this close to each head


def _registration_error(estimate: np.ndarray, truth: np.ndarray, centres: list[np.ndarray]) -> float:
    """Mean distance between where ``estimate`` and ``truth`` map points within 30 mm of the heads."""
    rng = np.random.default_rng(0)
    errors = []
    for centre in centres:
        direction = rng.normal(size=(2000, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        radius = NEAR_HEAD_MM * rng.random(2000) ** (1 / 3)  # uniform in the ball
        points = np.c_[centre + direction * radius[:, None], np.ones(2000)]
        errors.append(np.linalg.norm((points @ (estimate - truth).T)[:, :3], axis=1).mean())
    return float(np.mean(errors))


def _patient(scan, truth: dict, settings: PreprocessSettings) -> dict:
    """Time each step for one patient and measure its errors against the truth."""
    times = dict.fromkeys(STEPS, 0.0)
    problems = ProblemLog()
    started = time.perf_counter()
    volumes = {
        p: v
        for p, s in scan.series.items()
        if p != "CT" and p in settings.protocols and (v := load_volume(s, problems)) is not None
    }
    ct = load_volume(scan.series["CT"], problems) if "CT" in scan.series else None
    times["decode"] = time.perf_counter() - started
    anchor = volumes.get(settings.anchor_protocol)
    row: dict = {"patient": truth["patient_id"][:4] + "...", "has_ct": ct is not None, "head_error_mm": {}}
    if anchor is None:
        row["times_s"] = times
        return row
    started = time.perf_counter()
    try:
        heads = localize_femoral_heads(anchor)
    except LocalizationError as exc:
        row["error"] = str(exc)
        heads = {}
    times["localise"] = time.perf_counter() - started
    for side, head in heads.items():
        true_centre = np.asarray(truth["hips"][side]["centre_mm"])
        row["head_error_mm"][side] = float(np.linalg.norm(head.centre_mm - true_centre))
    started = time.perf_counter()
    for side, head in heads.items():
        crop_hip_protocols(volumes, head.centre_mm, side, settings)
    times["crop"] = time.perf_counter() - started
    if ct is not None and heads:
        centres = [h.centre_mm for h in heads.values()]
        started = time.perf_counter()
        result = register_rigid(anchor, ct, centres_mm=centres)
        times["register"] = time.perf_counter() - started
        row["registration_error_mm"] = _registration_error(
            result.matrix, np.asarray(truth["ct_offset"]["matrix"]), centres
        )
        started = time.perf_counter()
        for side, head in heads.items():
            ct_pairs_for_hip(volumes, ct, result.matrix, head.centre_mm, side, settings)
        times["pairs"] = time.perf_counter() - started
    row["times_s"] = times
    return row


def _load_site_cold(data: Path, workers: int) -> dict:
    """Cold ``load_site`` of every site in a fresh process per site (cache in a temp folder)."""
    code = (
        "import sys,time;from pathlib import Path;from common.sitedata.load import load_site;"
        "from common.sitedata.settings import PreprocessSettings;t=time.perf_counter();"
        "load_site(Path(sys.argv[1]),Path(sys.argv[2]),PreprocessSettings(),split_seed=0,workers=int(sys.argv[3]));"
        "print(time.perf_counter()-t)"
    )
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="prep_bench_cache_") as cache:
        for site in site_dirs(data):
            out = subprocess.run(
                [sys.executable, "-c", code, str(site), str(Path(cache) / site.name), str(workers)],
                capture_output=True,
                text=True,
                check=True,
            )
            seconds[site.name] = float(out.stdout.strip().splitlines()[-1])
            print(f"load_site {site.name} cold, workers={workers}: {seconds[site.name]:.1f} s", flush=True)
    return {"workers": workers, "seconds": seconds, "total_s": sum(seconds.values())}


def _synthesise(temp: Path) -> Path:
    """A small federation (1 site x 6 patients) in ``temp``, written by ``onfh synth``."""
    data = temp / "fed"
    synth = ["synth", "--sites", "1", "--patients", "6", "--seed", "0", str(data)]
    subprocess.run([sys.executable, "-m", "common.cli", *synth], check=True)
    return data


def measure_patients(data: Path, quick: bool, limit: int) -> list[dict]:
    """Every (or the first ``limit``, or with ``quick`` 2 with CT) patient of each site, timed."""
    settings = PreprocessSettings()
    rows = []
    for site in site_dirs(data):
        truth = {t["patient_id"]: t for t in json.loads((data / f"{site.name}.truth.json").read_text())}
        scan = scan_site(site)
        patients = [p for p in scan.patients.values() if p.patient_id in truth]
        if quick:
            patients = [p for p in patients if p.has_ct][:2]
        elif limit:
            patients = patients[:limit]
        for patient in patients:
            row = _patient(patient, truth[patient.patient_id], settings)
            row["site"] = site.name
            rows.append(row)
            times = " ".join(f"{k} {v:5.2f}" for k, v in row["times_s"].items())
            heads = " ".join(f"{s} {e:.2f}" for s, e in row["head_error_mm"].items())
            reg = row.get("registration_error_mm")
            print(
                f"{site.name} {row['patient']}: {times} s | head error mm {heads}"
                + (f" | registration error {reg:.2f} mm" if reg is not None else ""),
                flush=True,
            )
    return rows


def summarise(rows: list[dict]) -> dict:
    """Mean and median step times and the localisation / registration errors; printed too."""
    head_errors = [e for r in rows for e in r["head_error_mm"].values()]
    reg_errors = [r["registration_error_mm"] for r in rows if "registration_error_mm" in r]
    summary = {
        "patients": len(rows),
        "patients_with_ct": len(reg_errors),
        "median_step_s": {k: float(np.median([r["times_s"][k] for r in rows])) for k in STEPS},
        "mean_step_s": {k: float(np.mean([r["times_s"][k] for r in rows])) for k in STEPS},
        "mean_step_s_with_ct": {
            k: float(np.mean([r["times_s"][k] for r in rows if r["has_ct"]] or [0.0])) for k in STEPS
        },
        "head_error_mm": {
            "median": float(np.median(head_errors)),
            "worst": float(np.max(head_errors)),
            "n": len(head_errors),
        },
        "registration_error_mm": {
            "median": float(np.median(reg_errors)) if reg_errors else None,
            "worst": float(np.max(reg_errors)) if reg_errors else None,
            "n": len(reg_errors),
        },
    }
    print("mean s per patient: " + " ".join(f"{k} {v:.2f}" for k, v in summary["mean_step_s"].items()))
    print(
        f"head centre error: median {summary['head_error_mm']['median']:.2f} mm, "
        f"worst {summary['head_error_mm']['worst']:.2f} mm ({len(head_errors)} heads); "
        f"registration error: median {summary['registration_error_mm']['median'] or 0:.2f} mm, "
        f"worst {summary['registration_error_mm']['worst'] or 0:.2f} mm ({len(reg_errors)} patients)"
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the figures written to the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a federation written by `onfh synth` (read only)")
    parser.add_argument("--quick", action="store_true", help="2 patients with CT per site")
    parser.add_argument("--patients", type=int, default=0, help="patients per site (0: all)")
    parser.add_argument(
        "--load-site", type=int, default=0, metavar="WORKERS", help="also time cold load_site"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/preprocessing.json"))
    args = parser.parse_args(argv)
    temp = None if args.data is not None else Path(tempfile.mkdtemp(prefix="prep_bench_fed_"))
    try:
        data = args.data if temp is None else _synthesise(temp)
        rows = measure_patients(data, args.quick, args.patients)
        summary = summarise(rows)
        if args.load_site:
            summary["load_site_cold"] = _load_site_cold(data, args.load_site)
            print(f"load_site cold total: {summary['load_site_cold']['total_s']:.1f} s")
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    figures = {
        "data": str(data if temp is None else "synthesised: 1 site x 6 patients, seed 0"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "summary": summary,
        "patients": rows,
    }
    write_json(args.out, figures)
    return figures


if __name__ == "__main__":
    main()
