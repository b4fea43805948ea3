"""Calibrating the phantom's difficulty: the MR lesion-contrast sweep of docs/phantom.md.

For each contrast (the other knobs at the ``clinical`` preset), a federation from a tuning seed
(default 101; never the evaluation seed of docs/benchmarks.md), 4 sites x 30 patients at the
default size, and on its pooled sites four scorers:

    site prior   each site's training stage frequencies: all a model learns from knowing the
                 site alone (sites differ in scanner and in stage mix, so this is the real
                 floor of a pooled AUROC, not 0.5)
    radiomics    intensity statistics + logistic regression (simulation/radiomics.py)
    plain VGG    centralized, fusion=plain, no pretraining   } the run config's budget
    full model   centralized, attention fusion, pretrained   } (presets/default.toml)

each scored by the pooled macro AUROC on the validation hips (what the choice reads) and on the
test hips of that tuning federation.

Usage (from the repository root; about 12 min per contrast on 2 cores):
    .venv/bin/python -m benchmarks.bench_difficulty --contrasts 0.6 0.3 0.1
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from benchmarks.evaluation import tuning_seed
from benchmarks.harness import PRESETS, command, machine, markdown, site_dirs, write_json

WORK = Path("/tmp/onfh-bench/difficulty")
MODELS = {"plain VGG": ("plain", False), "full model": ("attention", True)}


def _load(data: Path, cfg) -> list:
    from common.sitedata.load import load_site

    return [
        load_site(d, WORK / f"cache-{data.name}" / d.name, cfg.preprocess, name=d.name)
        for d in site_dirs(data)
    ]


def _train(data: Path, cfg, model: str) -> tuple[str, str, dict]:
    """One centralized model on the pooled sites of ``data``: val and test pooled macro AUROC."""
    import torch

    from common.training.centralized import evaluate_sites, train_two_phase

    torch.set_num_threads(1)
    fusion, pretrained = MODELS[model]
    sites = _load(data, cfg)
    t0 = time.time()
    net, _ = train_two_phase(sites, cfg.replace(fusion=fusion, pretrained=pretrained))
    row = {
        split: evaluate_sites(net, sites, split, n_boot=0)["pooled"]["macro_auroc"]
        for split in ("val", "test")
    }
    return data.name, model, {**row, "seconds": round(time.time() - t0)}


def _baselines(data: Path, cfg) -> dict:
    from simulation.radiomics import radiomics_auroc, site_prior_auroc

    sites = _load(data, cfg)
    return {
        "site prior": {split: site_prior_auroc(sites, split) for split in ("val", "test")},
        "radiomics": {split: radiomics_auroc(sites, split) for split in ("val", "test")},
        "labelled hips": {
            split: int(sum(len(s.staging_set(split)[2]) for s in sites)) for split in ("val", "test")
        },
    }


def prepare(contrast: float, seed: int, sites: int, patients: int, size: str, cfg) -> Path:
    """The tuning federation at one contrast, generated (or reused) and preprocessed."""
    from simulation.main_job import preprocess_sites
    from simulation.phantom.difficulty import difficulty_named
    from simulation.synth.federation import generate_federation

    data = WORK / f"fed-{size}-{sites}x{patients}-s{seed}-c{contrast:g}"
    difficulty = difficulty_named("clinical", mr_lesion_contrast=contrast)
    generate_federation(data, sites=sites, patients=patients, seed=seed, size=size, difficulty=difficulty)
    preprocess_sites(cfg.replace(cache_dir=str(WORK / f"cache-{data.name}")), site_dirs(data))
    return data


def table(results: dict) -> str:
    names = ["site prior", "radiomics", *MODELS]
    rows = []
    for key, row in results["contrasts"].items():
        cells = [key, f"{row['labelled hips']['val']} / {row['labelled hips']['test']}"]
        for name in names:
            value = row.get(name)
            cells.append("-" if value is None else f"{value['val']:.3f} / {value['test']:.3f}")
        rows.append(cells)
    return markdown(
        ["mr-lesion-contrast", "labelled hips val / test", *[f"{n}: val / test" for n in names]], rows
    )


def main(argv: list[str] | None = None) -> int:
    from common.config import load_run_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contrasts", type=float, nargs="+", default=[0.6, 0.3, 0.1])
    parser.add_argument(
        "--seed", type=int, default=101, help="tuning federation seed (never the evaluation seed)"
    )
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--size", choices=["default", "tiny"], default="default", help="tiny: smoke only")
    parser.add_argument("--config", type=Path, default=PRESETS / "default.toml")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/difficulty.json"))
    args = parser.parse_args(argv)
    tuning_seed(args.seed)
    cfg = load_run_config(args.config)
    info = machine()
    results: dict = {"command": command("bench_difficulty", argv), **info, "seed": args.seed, "contrasts": {}}
    datasets = {}
    for contrast in args.contrasts:
        data = prepare(contrast, args.seed, args.sites, args.patients, args.size, cfg)
        datasets[data.name] = f"{contrast:g}"
        results["contrasts"][f"{contrast:g}"] = _baselines(data, cfg)
        print(f"contrast {contrast:g}: {results['contrasts'][f'{contrast:g}']}", flush=True)
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_train, WORK / name, cfg, m) for name in datasets for m in MODELS]
        for future in as_completed(jobs):
            name, model, row = future.result()
            results["contrasts"][datasets[name]][model] = row
            print(f"contrast {datasets[name]} {model}: {row}", flush=True)
            write_json(args.out, results)
    write_json(args.out, results)
    print(table(results))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
