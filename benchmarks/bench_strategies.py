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
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from common.training.centralized import load_run_config
from simulation.baselines import pooled_local_auroc, run_baselines

PRESETS = Path(__file__).resolve().parent.parent / "presets"
STRATEGIES = {  # name -> preset applied over the default one
    "FedAvg": None,
    "FedProx": PRESETS / "fedprox.toml",
    "FedBN": PRESETS / "fedbn.toml",
}


def _strategy_overrides(preset: Path | None) -> dict:
    import tomllib

    if preset is None:
        return {}
    return {k.replace("-", "_"): v for k, v in tomllib.loads(preset.read_text()).items()}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return float("nan"), 0.0
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


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
        mean, sd = _mean_sd(values)
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
            mean, _ = _mean_sd(values)
            cells.append("-" if not np.isfinite(mean) else f"{mean:.3f} ({hips[0] if hips else 0})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _auroc(value) -> float:
    # an AUROC is undefined (NaN, or -1 from a site) on a test set holding a single stage
    return float("nan") if value is None or value != value or value < 0 else float(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/fed_default"), help="federation folder")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cache_default"), help="cache root (site-NN)")
    parser.add_argument("--config", type=Path, default=PRESETS / "default.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke: 1 round of 1 epoch per phase")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/strategies.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onfh-strategy-runs"))
    args = parser.parse_args(argv)

    from simulation.main_job import run_federated

    overrides = {
        "split_seed": args.split_seed,
        "data_root": str(args.data.resolve()),
        "cache_dir": str(args.cache.resolve()),
        "output_dir": str(args.workdir.resolve()),
    }
    if args.quick:
        overrides.update(
            pretrain_rounds=1, pretrain_epochs=1, pretrain_max_pairs=200, stage_rounds=1, stage_epochs=1
        )
    base = load_run_config(args.config, **overrides)
    site_dirs = sorted(d for d in args.data.glob("site-*") if d.is_dir())
    if not site_dirs:
        print(f"no site-NN folders in {args.data}: pass --data with a federation from 'onfh synth'")
        return 2
    setup = {
        "data": str(args.data.resolve()),
        "split_seed": args.split_seed,
        "quick": args.quick,
        "budget": {
            k: getattr(base, k)
            for k in ("pretrain_rounds", "pretrain_epochs", "stage_rounds", "stage_epochs", "batch_size")
        },
    }
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs: list[dict] = previous.get("runs", []) if previous.get("setup") == setup else []
    started = time.time()
    results = {
        "command": "python -m benchmarks.bench_strategies "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "date": date.today().isoformat(),
        "setup": setup,
        "runs": runs,
    }

    def done(method: str, seed: int) -> bool:
        return any(r["method"] == method and r["seed"] == seed for r in runs)

    def record(run: dict) -> None:
        runs.append(run)
        results["seconds"] = time.time() - started
        results["table"] = tables(runs)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(
            f"seed {run['seed']} {run['method']:<11} pooled test macro AUROC {run['pooled']:.3f} "
            f"({run['seconds']:.0f} s)",
            flush=True,
        )

    for seed in args.seeds:
        cfg = base.replace(seed=seed)
        if not (done("centralized", seed) and done("local-only", seed)):
            t0 = time.time()
            central, local = run_baselines(cfg, site_dirs)
            seconds = time.time() - t0
            record(
                {
                    "seed": seed,
                    "method": "centralized",
                    "pooled": _auroc(central["pooled"]["macro_auroc"]),
                    "sites": {
                        n: {"auroc": _auroc(v["macro_auroc"]), "hips": v["n_samples"]}
                        for n, v in central["sites"].items()
                    },
                    "seconds": seconds,
                }
            )
            record(
                {
                    "seed": seed,
                    "method": "local-only",
                    "pooled": _auroc(pooled_local_auroc(local)),
                    "sites": {
                        n: {"auroc": _auroc(v["sites"][n]["macro_auroc"]), "hips": v["sites"][n]["n_samples"]}
                        for n, v in local.items()
                        if n in v.get("sites", {})
                    },
                    "seconds": seconds,
                }
            )
        for method, preset in STRATEGIES.items():
            if done(method, seed):
                continue
            run_cfg = cfg.replace(
                **_strategy_overrides(preset), run_name=f"{method.lower()}-seed{seed}-{os.getpid()}"
            )
            t0 = time.time()
            test = run_federated(run_cfg, len(site_dirs))["test"]
            record(
                {
                    "seed": seed,
                    "method": method,
                    "pooled": _auroc(test.get("macro-auroc")),
                    "sites": {
                        n: {"auroc": _auroc(v.get("macro-auroc")), "hips": int(v.get("num-examples", 0))}
                        for n, v in test.get("sites", {}).items()
                    },
                    "seconds": time.time() - t0,
                }
            )
    print()
    print(tables(runs))
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
    print(
        f"\nheadline: federated / centralized pooled test macro AUROC: {', '.join(parts)} "
        f"(centralized {np.mean(central_values):.3f}) over seeds {args.seeds}, "
        f"{time.time() - started:.0f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
