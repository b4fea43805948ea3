"""Federated strategies on the evaluation federation: each beside FedAvg, on the same patients.

For each training seed that ``benchmarks.evaluation`` has run (its FedAvg, centralized and local-only
columns), one federated run per strategy preset (``presets/<name>.toml`` over the evaluation budget;
only the aggregation changes), its delivered models scored on their own sites' test hips. Reported:
the pooled macro AUROC with its patient-level 95% interval, the paired difference from FedAvg (the
same hips, patients resampled together, with its p-value), the ratio to that seed's centralized
AUROC, and per-stage sensitivity. Nothing here is chosen: the presets were fixed on tuning seeds.

Results: ``benchmarks/results/evaluation_strategies.json`` (a cut run continues), tables printed.

Usage (from the repository root, after ``benchmarks.evaluation`` for the same seeds; about 10 min
per strategy and seed on 2 cores):
    .venv/bin/python -m benchmarks.evaluation_strategies --strategies fedprox fedbn --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import harness
from benchmarks.evaluation import budget, earlier_results, evaluation_federation, seed_config
from benchmarks.harness import PRESETS, command, delivered_federated, machine, markdown, mean_sd, write_json


def preset_overrides(name: str) -> dict:
    """The run-config changes of ``presets/<name>.toml`` (keys as RunConfig fields)."""
    path = PRESETS / f"{name}.toml"
    if not path.is_file():
        raise SystemExit(f"no strategy preset {path}: name one of the presets in {PRESETS}")
    return harness.preset_overrides(path)


def run_strategy(seed: int, name: str, dirs: list[Path]) -> dict:
    """One federated run of preset ``name`` with training seed ``seed``, scored beside FedAvg's."""
    fedavg = seed_config(seed)
    cfg = fedavg.replace(**preset_overrides(name), run_name=f"{fedavg.run_name}-{name}")
    t0 = time.time()
    scored = delivered_federated(cfg, dirs)
    seconds = time.time() - t0
    baseline = delivered_federated(fedavg, dirs)
    summary = scored.summary()
    return {
        "macro-auroc": summary["macro-auroc"],
        "ci95": summary["ci95"]["macro-auroc"],
        "sensitivity": summary["sensitivity"],
        "balanced-accuracy": summary["balanced-accuracy"],
        "minus FedAvg": scored.versus(baseline),
        "seconds": round(seconds),
    }


def table(results: dict, evaluation: dict) -> str:
    """Per strategy and seed, and mean +- SD over seeds: AUROC, difference from FedAvg, ratio to centralized."""
    from simulation.comparison import p_value

    rows = []
    for name, seeds in results["strategies"].items():
        values, differences, ratios = [], [], []
        for seed, run in seeds.items():
            central = evaluation["seeds"].get(seed, {}).get("pooled-patient-level", {}).get("centralized", {})
            ratio = run["macro-auroc"] / central["macro-auroc"] if central.get("macro-auroc") else None
            d = run["minus FedAvg"]
            values.append(run["macro-auroc"])
            differences.append(d["difference"])
            ratios.append(ratio)
            rows.append(
                [
                    name,
                    seed,
                    f"{run['macro-auroc']:.3f} ({run['ci95'][0]:.3f}-{run['ci95'][1]:.3f})",
                    f"{d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}), {p_value(d['p'])}",
                    "-" if ratio is None else f"{ratio:.3f}",
                    " / ".join("-" if x is None else f"{x:.2f}" for x in run["sensitivity"]),
                ]
            )
        if len(seeds) > 1:
            (m, s), (dm, ds) = mean_sd(values), mean_sd(differences)
            ratios = [r for r in ratios if r is not None]
            ratio = f"{np.mean(ratios):.3f} (n = {len(ratios)})" if ratios else "-"
            rows.append([name, "mean +- SD", f"{m:.3f} +- {s:.3f}", f"{dm:+.3f} +- {ds:.3f}", ratio, ""])
    header = [
        "strategy",
        "training seed",
        "pooled macro AUROC (95% CI)",
        "minus FedAvg (paired)",
        "over centralized",
        "sensitivity I / II / III / IV",
    ]
    return markdown(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", default=["fedprox", "fedbn"], help="presets/<name>.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--evaluation", type=Path, default=Path("benchmarks/results/evaluation.json"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluation_strategies.json"))
    args = parser.parse_args(argv)
    settings = budget(seed_config(0))
    evaluation = json.loads(args.evaluation.read_text()) if args.evaluation.is_file() else {}
    if evaluation.get("budget") != settings:
        print(f"{args.evaluation} is missing or was run with other settings: run benchmarks.evaluation first")
        return 2
    missing = [s for s in args.seeds if str(s) not in evaluation["seeds"]]
    if missing:
        print(
            f"seeds {missing} have no FedAvg run in {args.evaluation}: run benchmarks.evaluation --seeds {missing}"
        )
        return 2
    dirs = evaluation_federation()
    previous = earlier_results(args.out, settings)
    results = {
        "command": command("evaluation_strategies", argv),
        **machine(),
        "budget": settings,
        "presets": {
            **previous.get("presets", {}),
            **{name: preset_overrides(name) for name in args.strategies},
        },
        "strategies": previous.get("strategies", {}),
    }
    for seed in args.seeds:  # seed by seed, so that a cut run leaves every strategy with as many seeds
        for name in args.strategies:
            done = results["strategies"].setdefault(name, {})
            if str(seed) not in done:
                done[str(seed)] = run_strategy(seed, name, dirs)
                print(
                    f"seed {seed} {name}: pooled macro AUROC {done[str(seed)]['macro-auroc']:.3f}", flush=True
                )
                write_json(args.out, results)
    print(table(results, evaluation))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
