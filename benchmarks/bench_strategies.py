"""Federated (FedAvg, FedProx, FedBN) vs centralized vs local-only, per site and pooled.

For each seed: the centralized (all sites' training hips pooled) and local-only (each site
alone) baselines, trained as ``onfh simulate`` trains them, then one federated run per
strategy preset in Flower's simulation runtime; all scored on the same held-out hips (fixed
patient split, ``--split-seed``), with the ratio federated / centralized of the pooled test
macro AUROC. Every run has the budget of ``presets/default.toml``; a strategy preset changes
only the aggregation (``presets/fedprox.toml``: proximal term mu 0.01; ``presets/fedbn.toml``:
normalisation layers stay at the sites).

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_strategies --seeds 0 1
    .venv/bin/python -m benchmarks.bench_strategies --quick     # smoke: 1 round per phase, seed 0

``--data``/``--cache`` default to the default synthetic federation used by the ablation. Prints
one line per run, the tables, the headline last, and writes JSON (default
``benchmarks/results/strategies.json``, rewritten after every run; runs already in it with
the same setup are kept, so a cut run continues).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import (
    DEFAULT_CACHE,
    DEFAULT_DATA,
    PRESETS,
    QUICK_BUDGET,
    RunLog,
    command,
    machine,
    mean_sd,
    preset_overrides,
    previous_runs,
    site_dirs,
)
from common.config import load_run_config
from simulation.baselines import pooled_local_auroc, run_baselines

STRATEGIES = {  # name -> preset applied over the default one
    "FedAvg": None,
    "FedProx": PRESETS / "fedprox.toml",
    "FedBN": PRESETS / "fedbn.toml",
}


def _strategy_overrides(preset: Path | None) -> dict:
    return {} if preset is None else preset_overrides(preset)


def tables(runs: list[dict]) -> str:
    """Pooled table (mean +- SD over seeds, ratio to centralized) and a per-site table (seed means)."""
    methods = ["centralized", "local-only", *STRATEGIES]
    lines = [
        "| method | pooled test macro AUROC, mean +- SD (per seed) | ratio to centralized, mean (per seed) |",
        "|---|---|---|",
    ]
    seeds = sorted({r["seed"] for r in runs})
    central = {r["seed"]: r["pooled"] for r in runs if r["method"] == "centralized"}
    for method in methods:
        rows = {r["seed"]: r for r in runs if r["method"] == method}
        if not rows:
            continue
        values = [rows[s]["pooled"] for s in seeds if s in rows]
        mean, sd = mean_sd(values)
        ratios = [rows[s]["pooled"] / central[s] for s in seeds if s in rows and central.get(s)]
        ratio_text = f"{np.mean(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})" if ratios else "-"
        lines.append(
            f"| {method} | {mean:.3f} +- {sd:.3f} ({', '.join(f'{v:.3f}' for v in values)}) | {ratio_text} |"
        )
    sites = sorted({name for r in runs for name in r["sites"]})
    lines += ["", "| method | " + " | ".join(f"{s} (test hips)" for s in sites) + " |"]
    lines.append("|---|" + "---|" * len(sites))
    for method in methods:
        rows = [r for r in runs if r["method"] == method]
        if not rows:
            continue
        cells = []
        for site in sites:
            values = [r["sites"][site]["auroc"] for r in rows if site in r["sites"]]
            hips = [r["sites"][site]["hips"] for r in rows if site in r["sites"]]
            mean, _ = mean_sd(values)
            cells.append("-" if not np.isfinite(mean) else f"{mean:.3f} ({hips[0] if hips else 0})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _auroc(value) -> float:
    # an AUROC is undefined (NaN, or -1 from a site) on a test set holding a single stage
    return float("nan") if value is None or value != value or value < 0 else float(value)


def run_baselines_of(cfg, dirs: list[Path], seed: int, log: RunLog) -> None:
    """The centralized and local-only baselines of one seed, recorded as two runs."""
    t0 = time.time()
    central, local = run_baselines(cfg, dirs)
    seconds = time.time() - t0
    central_sites = {
        n: {"auroc": _auroc(v["macro_auroc"]), "hips": v["n_samples"]} for n, v in central["sites"].items()
    }
    local_sites = {
        n: {"auroc": _auroc(v["sites"][n]["macro_auroc"]), "hips": v["sites"][n]["n_samples"]}
        for n, v in local.items()
        if n in v.get("sites", {})
    }
    for method, pooled, sites in (
        ("centralized", _auroc(central["pooled"]["macro_auroc"]), central_sites),
        ("local-only", _auroc(pooled_local_auroc(local)), local_sites),
    ):
        _record(log, {"seed": seed, "method": method, "pooled": pooled, "sites": sites, "seconds": seconds})


def run_strategy(cfg, method: str, preset: Path | None, n_sites: int, log: RunLog) -> None:
    """One federated run of a strategy preset, recorded."""
    from simulation.main_job import run_federated

    run_cfg = cfg.replace(
        **_strategy_overrides(preset), run_name=f"{method.lower()}-seed{cfg.seed}-{os.getpid()}"
    )
    t0 = time.time()
    test = run_federated(run_cfg, n_sites)["test"]
    sites = {
        n: {"auroc": _auroc(v.get("macro-auroc")), "hips": int(v.get("num-examples", 0))}
        for n, v in test.get("sites", {}).items()
    }
    run = {"seed": cfg.seed, "method": method, "pooled": _auroc(test.get("macro-auroc")), "sites": sites}
    _record(log, {**run, "seconds": time.time() - t0})


def _record(log: RunLog, run: dict) -> None:
    log.record(
        run,
        f"seed {run['seed']} {run['method']:<11} pooled test macro AUROC {run['pooled']:.3f} ({run['seconds']:.0f} s)",
    )


def headline(runs: list[dict], seeds: list[int], seconds: float, out: Path) -> str:
    central_values = [r["pooled"] for r in runs if r["method"] == "centralized"]
    parts = []
    for method in STRATEGIES:
        ratios = [
            r["pooled"] / c["pooled"]
            for r in runs
            if r["method"] == method
            for c in runs
            if c["method"] == "centralized" and c["seed"] == r["seed"] and c["pooled"]
        ]
        if ratios:
            parts.append(f"{method} {np.mean(ratios):.3f}")
    return (
        f"headline: federated / centralized pooled test macro AUROC: {', '.join(parts)} "
        f"(centralized {np.mean(central_values):.3f}) over seeds {seeds}, {seconds:.0f} s -> {out}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="federation folder")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache root (site-NN)")
    parser.add_argument("--config", type=Path, default=PRESETS / "default.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke: 1 round of 1 epoch per phase")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/strategies.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onfh-strategy-runs"))
    args = parser.parse_args(argv)
    overrides = {
        "split_seed": args.split_seed,
        "data_root": str(args.data.resolve()),
        "cache_dir": str(args.cache.resolve()),
        "output_dir": str(args.workdir.resolve()),
        **(QUICK_BUDGET if args.quick else {}),
    }
    base = load_run_config(args.config, **overrides)
    dirs = site_dirs(args.data)
    if not dirs:
        print(f"no site-NN folders in {args.data}: pass --data with a federation from 'onfh synth'")
        return 2
    budget_keys = ("pretrain_rounds", "pretrain_epochs", "stage_rounds", "stage_epochs", "batch_size")
    setup = {
        "data": str(args.data.resolve()),
        "split_seed": args.split_seed,
        "quick": args.quick,
        "budget": {k: getattr(base, k) for k in budget_keys},
    }
    info = machine()
    results = {
        "command": command("bench_strategies", argv),
        "machine": info["machine"],
        "date": info["date"],
        "setup": setup,
        "runs": previous_runs(args.out, "setup", setup),
    }
    log = RunLog(args.out, results, lambda r: r.update(table=tables(r["runs"])))
    for seed in args.seeds:
        cfg = base.replace(seed=seed)
        if not (log.done(method="centralized", seed=seed) and log.done(method="local-only", seed=seed)):
            run_baselines_of(cfg, dirs, seed, log)
        for method, preset in STRATEGIES.items():
            if not log.done(method=method, seed=seed):
                run_strategy(cfg, method, preset, len(dirs), log)
    print()
    print(tables(log.runs))
    print(f"\n{headline(log.runs, args.seeds, time.time() - log.started, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
