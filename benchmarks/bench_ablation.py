"""Ablation of the paper's two ingredients (pretraining, attention fusion), centralized and federated.

Four models per seed and mode, with the compute budget of the run config (default
``presets/default.toml``: pretraining 2 rounds x 1 epoch, staging 8 rounds x 4 epochs):

- centralized: ``train_two_phase`` on the pooled training hips of every site (epochs = rounds
  x epochs);
- federated: both phases in Flower's simulation runtime, one simulated site per site folder,
  the run config's strategy (FedAvg by default), exactly as ``onfh simulate`` runs them.

    plain VGG          fusion=plain,     pretrained=false
    + pretraining      fusion=plain,     pretrained=true
    + attention fusion fusion=attention, pretrained=false
    full model         fusion=attention, pretrained=true

Score: test macro AUROC pooled over all sites' held-out hips. The patient split is fixed
(``--split-seed``); ``--seeds`` changes the initialisation, shuffling and augmentation. In the
centralized mode phase 1 runs once per seed and is shared by the two pretrained models; in the
federated mode each pretrained model runs its own federated phase 1.

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_ablation --seeds 0 1 2            # both modes
    .venv/bin/python -m benchmarks.bench_ablation --modes central --seeds 0
    .venv/bin/python -m benchmarks.bench_ablation --quick                  # smoke: 1 epoch each, seed 0

Prints one line per model, the table, the headline last, and writes JSON (default
``benchmarks/results/ablation.json``, rewritten after every model). Runs already in that file
(same mode, seed and model) are kept and not run again, so a cut run continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import (
    DEFAULT_CACHE,
    DEFAULT_DATA,
    PRESETS,
    QUICK_BUDGET,
    RunLog,
    command,
    machine,
    previous_runs,
    site_dirs,
)
from common.config import load_run_config
from common.sitedata.load import load_site
from common.training.centralized import evaluate_sites, pretrain_translation, train_two_phase

# (name, fusion, pretrained); the paper's gain is the full model's AUROC minus this row's, in points.
CONFIGS: tuple[tuple[str, str, bool], ...] = (
    ("plain VGG", "plain", False),
    ("+ pretraining", "plain", True),
    ("+ attention fusion", "attention", False),
    ("full model", "attention", True),
)
MODES = ("central", "federated")
PAPER_GAIN_OF_FULL = {  # Kim et al. 2023: full model over each ablated model, AUROC points
    "plain VGG": 6.8,
    "+ pretraining": 2.6,  # = the "without attention fusion" ablation
    "+ attention fusion": 4.7,  # = the "without self-supervised learning" ablation
    "full model": 0.0,
}


def _summary(values: list[float]) -> dict:
    finite = [v for v in values if np.isfinite(v)]
    return {
        "per_seed": values,
        "mean": float(np.mean(finite)) if finite else float("nan"),
        "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
    }


def summarise(runs: list[dict]) -> dict:
    """``{mode: {model: {"per_seed", "mean", "sd"}}}`` over the runs done so far."""
    summary: dict = {}
    for mode in MODES:
        for name, _, _ in CONFIGS:
            values = [
                r["test_macro_auroc"] for r in runs if r.get("mode", "central") == mode and r["model"] == name
            ]
            if values:
                summary.setdefault(mode, {})[name] = _summary(values)
    return summary


def table(results: dict) -> str:
    """Markdown table: per mode AUROC mean +- SD over seeds and the full model's gain over each
    row, with the paper's gain beside."""
    modes = [m for m in MODES if m in results["summary"]]
    header = "| model | fusion | pretrained |"
    for mode in modes:
        header += f" {mode}: test macro AUROC, mean +- SD (per seed) | {mode}: full minus this row (points) |"
    lines = [header + " paper: full minus this row |", "|---|---|---|" + "---|---|" * len(modes) + "---|"]
    for name, fusion, pretrained in CONFIGS:
        cells = f"| {name} | {fusion} | {str(pretrained).lower()} |"
        for mode in modes:
            rows = results["summary"][mode]
            row, full = rows.get(name), rows.get("full model", {}).get("mean", float("nan"))
            if row is None:
                cells += " - | - |"
                continue
            seeds = ", ".join(f"{v:.3f}" for v in row["per_seed"])
            cells += f" {row['mean']:.3f} +- {row['sd']:.3f} ({seeds}) | {100 * (full - row['mean']):+.1f} |"
        paper = PAPER_GAIN_OF_FULL[name]
        lines.append(cells + f" {'+' if paper else ''}{paper:.1f} |")
    return "\n".join(lines)


def federated_run(base, data: Path, cache: Path, n_sites: int, workdir: Path) -> tuple[dict, float]:
    """Both phases in Flower's simulation runtime with ``base``; returns the test summary and seconds."""
    from simulation.main_job import run_federated

    cfg = base.replace(
        data_root=str(data.resolve()),
        cache_dir=str(cache.resolve()),
        output_dir=str(workdir.resolve()),
        run_name=f"{base.fusion}-{'pre' if base.pretrained else 'scratch'}-seed{base.seed}-{os.getpid()}",
    )
    t0 = time.time()
    results = run_federated(cfg, n_sites)
    return results["test"], time.time() - t0


def _central_run(sites, cfg, translation_state, pretrain_info, pretrain_seconds) -> dict:
    t0 = time.time()
    net, info = train_two_phase(sites, cfg, translation_state=translation_state)
    scores = evaluate_sites(net, sites, n_boot=1000)
    pooled = scores["pooled"]
    return {
        "test_macro_auroc": pooled["macro_auroc"],
        "test_macro_auroc_ci": pooled["macro_auroc_ci"],
        "test_per_stage_auroc": pooled["per_stage_auroc"],
        "test_accuracy": pooled["accuracy"],
        "test_balanced_accuracy": pooled["balanced_accuracy"],
        "test_qwk": pooled["qwk"],
        "test_hips": pooled["n_samples"],
        "per_site_auroc": {k: v["macro_auroc"] for k, v in scores["sites"].items()},
        "train_loss_last_epoch": info["stage"]["loss"],
        "train_accuracy_last_epoch": info["stage"]["accuracy"],
        "stage_seconds": time.time() - t0,
        "pretrain_seconds": pretrain_seconds if cfg.pretrained else 0.0,
        "pretrain_loss": pretrain_info.get("loss") if cfg.pretrained else None,
    }


def _federated_row(test: dict, seconds: float) -> dict:
    return {
        "test_macro_auroc": test["macro-auroc"],
        "test_per_stage_auroc": [test.get(f"auroc-stage-{s}") for s in range(1, 5)],
        "test_accuracy": test.get("accuracy"),
        "test_balanced_accuracy": test.get("balanced-accuracy"),
        "test_qwk": test.get("qw-kappa"),
        "test_hips": int(test.get("n-hips", 0)),
        "per_site_auroc": {k: v.get("macro-auroc") for k, v in test.get("sites", {}).items()},
        "seconds": seconds,
    }


def _line(run: dict) -> str:
    return (
        f"{run['mode']:<9} seed {run['seed']} {run['model']:<19} AUROC {run['test_macro_auroc']:.3f} "
        f"({run['test_hips']} hips)"
    )


def central_seed(sites: list, cfg_seed, log: RunLog) -> None:
    """The four models of one seed, centralized; phase 1 once, shared by the pretrained two."""
    seed = cfg_seed.seed
    t0 = time.time()
    translation_state, pretrain_info = pretrain_translation(sites, cfg_seed.replace(pretrained=True))
    pretrain_seconds = time.time() - t0
    print(f"central seed {seed}: phase 1 in {pretrain_seconds:.0f} s", flush=True)
    for name, fusion, pretrained in CONFIGS:
        if log.done(mode="central", seed=seed, model=name):
            continue
        cfg = cfg_seed.replace(fusion=fusion, pretrained=pretrained)
        row = _central_run(sites, cfg, translation_state, pretrain_info, pretrain_seconds)
        run = {
            "mode": "central",
            "seed": seed,
            "model": name,
            "fusion": fusion,
            "pretrained": pretrained,
            **row,
        }
        log.record(run, _line(run))


def federated_seed(cfg_seed, args, n_sites: int, log: RunLog) -> None:
    """The four models of one seed, each a federated run (its own phase 1)."""
    seed = cfg_seed.seed
    for name, fusion, pretrained in CONFIGS:
        if log.done(mode="federated", seed=seed, model=name):
            continue
        cfg = cfg_seed.replace(fusion=fusion, pretrained=pretrained)
        test, seconds = federated_run(cfg, args.data, args.cache, n_sites, args.workdir)
        run = {"mode": "federated", "seed": seed, "model": name, "fusion": fusion, "pretrained": pretrained}
        run.update(_federated_row(test, seconds))
        log.record(run, _line(run))


def headline(summary: dict, seeds: list[int], seconds: float, out: Path) -> str:
    parts = []
    for mode, rows in summary.items():
        if "full model" in rows and "plain VGG" in rows:
            full, plain = rows["full model"]["mean"], rows["plain VGG"]["mean"]
            parts.append(
                f"{mode} full model {full:.3f} vs plain VGG {plain:.3f} ({100 * (full - plain):+.1f} points)"
            )
    return f"headline: {'; '.join(parts)} test macro AUROC (paper +6.8) over seeds {seeds}, {seconds:.0f} s -> {out}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="federation folder")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache root (site-NN)")
    parser.add_argument("--config", type=Path, default=PRESETS / "default.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--split-seed", type=int, default=0, help="patient split (fixed across seeds)")
    parser.add_argument("--quick", action="store_true", help="smoke: 1 epoch per phase, 200 pairs per site")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ablation.json"))
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/onfh-ablation-runs"), help="federated runs' outputs"
    )
    args = parser.parse_args(argv)
    base = load_run_config(args.config, split_seed=args.split_seed, **(QUICK_BUDGET if args.quick else {}))
    dirs = site_dirs(args.data)
    if not dirs:
        print(f"no site-NN folders in {args.data}: pass --data with a federation from 'onfh synth'")
        return 2
    started = time.time()
    sites = [
        load_site(d, args.cache / d.name, base.preprocess, split_seed=args.split_seed, name=d.name)
        for d in dirs
    ]
    counts = {s.name: {sp: len(s.staging_set(sp)[2]) for sp in ("train", "val", "test")} for s in sites}
    print(f"{len(sites)} sites loaded in {time.time() - started:.0f} s; labelled hips: {counts}")
    budget = {
        "pretrain_epochs": base.pretrain_rounds * base.pretrain_epochs,
        "pretrain_max_pairs_per_site": base.pretrain_max_pairs,
        "stage_epochs": base.stage_rounds * base.stage_epochs,
        "batch_size": base.batch_size,
        "model_preset": base.model_preset,
        "strategy": base.strategy,
    }
    kept = previous_runs(args.out, "budget", budget)
    runs = kept if kept and previous_runs(args.out, "labelled_hips", counts) else []
    if runs:
        print(f"{len(runs)} runs kept from {args.out} (same data, split and budget)")
    info = machine()
    results: dict = {
        "command": command("bench_ablation", argv),
        "machine": info["machine"],
        "date": info["date"],
        "torch": torch.__version__,
        "data": str(args.data),
        "labelled_hips": counts,
        "budget": budget,
        "runs": runs,
        "summary": summarise(runs),
    }
    log = RunLog(args.out, results, lambda r: r.update(summary=summarise(r["runs"])), {"mode": "central"})
    for seed in args.seeds:
        cfg_seed = base.replace(seed=seed)
        if "central" in args.modes and not all(
            log.done(mode="central", seed=seed, model=n) for n, _, _ in CONFIGS
        ):
            central_seed(sites, cfg_seed, log)
        if "federated" in args.modes:
            federated_seed(cfg_seed, args, len(dirs), log)
    print()
    print(table(results))
    print(f"\n{headline(results['summary'], args.seeds, time.time() - started, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
