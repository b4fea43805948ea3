"""Site-data benchmark: DICOM ingestion throughput, preprocessing time per hip, cold vs cached load_site.

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_ingestion             # 1 site x 30 patients, default size
    .venv/bin/python -m benchmarks.bench_ingestion --quick     # 1 site x 4 patients, tiny (smoke)
    .venv/bin/python -m benchmarks.bench_ingestion --data /tmp/bench_fed   # an existing federation

Prints one line per figure, the headline last, and writes the figures as JSON
(default ``benchmarks/results/ingestion.json``).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from benchmarks.harness import command, site_dirs, write_json
from common.problems import ProblemLog
from common.sitedata.dicom import load_volume, scan_site
from common.sitedata.load import load_site

CACHED_TARGET = 20.0  # cached load_site should be at least this many times faster than cold


def _ingestion(site_dir: Path) -> dict:
    """``scan_site`` + ``load_volume`` of every used series, against bare ``dcmread`` of the same files."""
    for path in site_dir.rglob("*"):  # warm the page cache so both readers see the same disk state
        if path.is_file():
            path.read_bytes()
    started = time.perf_counter()
    scan = scan_site(site_dir)
    scan_seconds = time.perf_counter() - started
    problems = ProblemLog()
    slices, files = 0, []
    for patient in scan.patients.values():
        for series in patient.series.values():
            volume = load_volume(series, problems)
            if volume is not None:
                slices += volume.pixels.shape[0]
                files += series.files
    ours = time.perf_counter() - started
    started = time.perf_counter()
    for path in files:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is what is timed
    bare = time.perf_counter() - started
    return {
        "files_walked": scan.n_files,
        "series_loaded": sum(len(p.series) for p in scan.patients.values()),
        "slices": slices,
        "scan_seconds": scan_seconds,
        "ingestion_seconds": ours,
        "ingestion_slices_per_s": slices / ours,
        "bare_dcmread_seconds": bare,
        "bare_dcmread_slices_per_s": slices / bare,
        "ratio_to_bare": (slices / ours) / (slices / bare),
    }


def _load_times(site_dir: Path, workers: int) -> dict:
    """Cold (empty cache) and cached ``load_site`` wall time."""
    cache = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        started = time.perf_counter()
        site = load_site(site_dir, cache, workers=workers, progress=lambda m: print("  " + m, flush=True))
        cold = time.perf_counter() - started
        cached_runs = []
        for _ in range(3):
            started = time.perf_counter()
            load_site(site_dir, cache)
            cached_runs.append(time.perf_counter() - started)
        cached = min(cached_runs)
        hips = len(site.stages)
        return {
            "patients": site.stats["patients"],
            "hips": hips,
            "pairs": len(site.pairs_mr),
            "patients_with_ct": site.stats["patients_with_ct"],
            "workers": workers,
            "cold_seconds": cold,
            "cold_seconds_per_hip": cold / max(hips, 1),
            "cpu_seconds_per_hip_estimate": cold * workers / max(hips, 1),
            "cached_seconds": cached,
            "cached_speedup": cold / cached,
        }
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke size: 1 site x 4 tiny patients")
    parser.add_argument("--data", type=Path, default=None, help="an existing federation (OUT of onfh synth)")
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--size", choices=("tiny", "default"), default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ingestion.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.patients, args.size = 4, "tiny"

    data = args.data
    if data is None:
        from simulation.synth.federation import generate_federation

        data = Path(tempfile.gettempdir()) / f"bench-ingestion-{args.size}-{args.patients}-{args.seed}"
        started = time.perf_counter()
        generate_federation(data, sites=1, patients=args.patients, seed=args.seed, size=args.size)
        print(f"synthetic site: {time.perf_counter() - started:.1f} s -> {data}")
    site_dir = site_dirs(Path(data))[0]

    ingestion = _ingestion(site_dir)
    print(
        f"ingestion: {ingestion['slices']} slices in {ingestion['series_loaded']} series, "
        f"scan_site+load_volume {ingestion['ingestion_slices_per_s']:.0f} slices/s vs bare dcmread "
        f"{ingestion['bare_dcmread_slices_per_s']:.0f} slices/s (ratio {ingestion['ratio_to_bare']:.2f})"
    )
    loads = _load_times(site_dir, args.workers)
    print(
        f"preprocessing: {loads['hips']} hips ({loads['patients']} patients, {loads['patients_with_ct']} with CT, "
        f"{loads['pairs']} MR-CT pairs) cold {loads['cold_seconds']:.1f} s with {loads['workers']} workers = "
        f"{loads['cold_seconds_per_hip']:.2f} s per hip"
    )
    results = {
        "command": command("bench_ingestion", argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "site": site_dir.name,
        "size": args.size if args.data is None else "given",
        "ingestion": ingestion,
        "load_site": loads,
        "cached_target": CACHED_TARGET,
        "cached_target_met": loads["cached_speedup"] >= CACHED_TARGET,
    }
    write_json(args.out, results)
    print(f"results -> {args.out}")
    print(
        f"headline: cached load_site {loads['cached_speedup']:.0f}x faster than cold "
        f"({loads['cached_seconds']:.3f} s vs {loads['cold_seconds']:.1f} s; target >= {CACHED_TARGET:.0f}x), "
        f"{loads['cold_seconds_per_hip']:.2f} s per hip, ingestion {ingestion['ingestion_slices_per_s']:.0f} slices/s "
        f"({ingestion['ratio_to_bare']:.2f}x bare dcmread)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
