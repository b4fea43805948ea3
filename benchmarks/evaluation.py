"""The evaluation federation: the federation benchmark figures are reported on, and nothing is tuned on.

Its data seed, ``EVALUATION_SEED``, is reserved: no default, budget, split or phantom knob is chosen
while looking at a result from it (tuning uses other seeds: the difficulty sweep 101, the
generalisation benchmark 2026 and 3031), and ``tuning_seed`` refuses it. 5 sites x 100 patients
of the ``clinical`` phantom at the default size, 60 % of each site's patients held out for test
(``presets/evaluation.toml``): about 350 labelled test hips, where the main job has about 30.

On it, per training seed (``--seeds``; the data stay the same), the main job's comparison with the
main job's budget: federated FedAvg, centralized, local-only, each with patient-level 95% intervals
and the federated model's paired differences; and the floors a pooled AUROC must beat (site prior,
radiomics). Results: ``benchmarks/results/evaluation.json``, the tables printed and
``docs/evaluation_seeds.png`` (each seed's AUROC with its interval).

Usage (from the repository root; 66 min for one training seed on 2 cores shared with other jobs):
    .venv/bin/python -m benchmarks.evaluation --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import PRESETS, command, machine, markdown, mean_sd, site_dirs, write_json

EVALUATION_SEED = 4242
SITES, PATIENTS, DIFFICULTY = 5, 100, "clinical"
WORK = Path("/tmp/onfh-bench/evaluation")
COLUMNS = ("federated", "centralized", "local-only")
DIFFERENCES = ("centralized", "local-only")  # federated minus each


def tuning_seed(seed: int) -> int:
    """``seed`` if it may be used to choose anything; the evaluation seed is refused."""
    if seed == EVALUATION_SEED:
        raise SystemExit(
            f"seed {seed} is the evaluation federation's, reserved for reporting (benchmarks/evaluation.py): "
            "tune on another seed"
        )
    return seed


def evaluation_federation(data: Path = WORK / "federation") -> list[Path]:
    """Write (or reuse) the evaluation federation; its site folders."""
    from simulation.synth.federation import generate_federation

    generate_federation(data, sites=SITES, patients=PATIENTS, seed=EVALUATION_SEED, difficulty=DIFFICULTY)
    return site_dirs(data)


def floors(cfg, dirs: list[Path]) -> dict:
    """What knowing the site alone, and a radiomics model, score on the test hips."""
    from simulation.generalisation import site_data
    from simulation.radiomics import radiomics_auroc, site_prior_auroc

    sites = [site_data(cfg, d) for d in dirs]
    fit_on = ("train", "val")
    return {
        "site prior": site_prior_auroc(sites, "test", fit_on),
        "radiomics": radiomics_auroc(sites, "test", fit_on),
        "labelled test hips": int(sum(len(s.staging_set("test")[2]) for s in sites)),
        "labelled train hips": int(sum(len(s.staging_set("train")[2]) for s in sites)),
    }


def seed_config(seed: int):
    """The run config of training seed ``seed`` on the evaluation federation (FedAvg, the main job's budget)."""
    from common.config import load_run_config

    return load_run_config(
        PRESETS / "evaluation.toml",
        seed=seed,
        data_root=str((WORK / "federation").resolve()),
        cache_dir=str((WORK / "cache").resolve()),
        output_dir=str((WORK / "runs").resolve()),
        run_name=f"evaluation-seed{seed}",
    )


def run_seed(seed: int, dirs: list[Path]) -> dict:
    """The main job's comparison with training seed ``seed``; its comparison.json."""
    from simulation.main_job import compare

    cfg = seed_config(seed)
    compare(cfg, dirs)
    return json.loads((cfg.run_dir / "comparison.json").read_text())


def table(results: dict) -> str:
    from simulation.comparison import p_value

    rows = []
    for seed, run in results["seeds"].items():
        figures = run["pooled-patient-level"]
        row = [seed]
        for column in COLUMNS:
            v = figures.get(column) or {}
            value, ci = v.get("macro-auroc"), v.get("ci95", {}).get("macro-auroc") or [None, None]
            row.append("-" if value is None else f"{value:.3f} ({_figure(ci[0])}-{_figure(ci[1])})")
        for other in DIFFERENCES:
            d = figures.get("federated", {}).get(f"minus {other}")
            row.append(
                "-"
                if d is None
                else f"{d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}), {p_value(d['p'])}"
            )
        rows.append(row)
    if len(results["seeds"]) > 1:  # the spread over training seeds, beside each seed's interval
        runs = [run["pooled-patient-level"] for run in results["seeds"].values()]
        columns = [[r.get(c, {}).get("macro-auroc") for r in runs] for c in COLUMNS]
        columns += [
            [r.get("federated", {}).get(f"minus {o}", {}).get("difference") for r in runs]
            for o in DIFFERENCES
        ]
        used = [[v for v in values if v is not None] for values in columns]
        row = ["mean +- SD over seeds"]
        for i, values in enumerate(used):
            sign = "+" if i >= len(COLUMNS) else ""
            mean, sd = mean_sd(values)
            row.append(f"{mean:{sign}.3f} +- {sd:.3f} (n = {len(values)})" if values else "-")
        rows.append(row)
    header = ["training seed", *[f"{c}: macro AUROC (95% CI)" for c in COLUMNS]]
    return markdown(header + ["federated minus centralized", "federated minus local-only"], rows)


def _figure(value, spec: str = ".3f") -> str:
    """A figure, or '-' where it is undefined (NaN is written to JSON as null)."""
    return "-" if value is None else format(value, spec)


def rates_table(results: dict) -> str:
    """Per seed and column: balanced accuracy, weighted kappa, ECE and each stage's sensitivity."""
    rows = []
    for seed, run in results["seeds"].items():
        for column in COLUMNS:
            v = run["pooled-patient-level"].get(column)
            if v:
                sensitivity = " / ".join(_figure(x, ".2f") for x in v["sensitivity"])
                figures = [_figure(v.get(key)) for key in ("balanced-accuracy", "qw-kappa", "ece")]
                rows.append([seed, column, *figures, sensitivity])
    header = [
        "training seed",
        "model",
        "balanced accuracy",
        "QW kappa",
        "ECE",
        "sensitivity I / II / III / IV",
    ]
    return markdown(header, rows)


def plot(results: dict, path: Path) -> None:
    """Each seed's pooled macro AUROC with its patient-level 95% interval, per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(results["seeds"])
    fig, ax = plt.subplots(figsize=(7, 4))
    hips = 0
    for j, seed in enumerate(seeds):
        for i, column in enumerate(COLUMNS):
            v = results["seeds"][seed]["pooled-patient-level"].get(column) or {}
            value, interval = v.get("macro-auroc"), v.get("ci95", {}).get("macro-auroc")
            if value is None or interval is None or None in interval:
                continue  # undefined (a test set with one stage): nothing to draw
            hips = v.get("hips", hips)
            ax.errorbar(
                i + (j - (len(seeds) - 1) / 2) * 0.15,
                value,
                yerr=[[value - interval[0]], [interval[1] - value]],
                fmt="o",
                color=f"C{j}",
                capsize=3,
                label=f"training seed {seed}",
            )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one entry per seed
    ax.set_xticks(range(len(COLUMNS)), COLUMNS)
    ax.set(
        ylabel="pooled macro AUROC (95% CI, patients resampled)",
        title=f"Evaluation federation (seed {EVALUATION_SEED}), {hips} test hips",
    )
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Where a run is written and which training seed it uses: everything else in the run config is the budget.
NOT_BUDGET = ("run-name", "seed", "data-root", "cache-dir", "output-dir", "device", "tracking", "resume")


def budget(cfg) -> dict:
    """The settings the seeds ran with: seeds run with other settings are not mixed in."""
    return {key: value for key, value in cfg.to_dict().items() if key not in NOT_BUDGET}


def earlier_results(out: Path, now: dict) -> dict:
    """The results at ``out`` if they were run with the settings ``now``; else they move aside."""
    if not out.is_file():
        return {}
    previous = json.loads(out.read_text())
    if previous.get("budget") == now:
        return previous
    kept = out.with_name(f"{out.stem}_{time.strftime('%Y%m%d-%H%M%S')}_other-settings.json")
    out.rename(kept)
    print(f"{out} was run with other settings: moved to {kept}; starting afresh", flush=True)
    return {}


def main(argv: list[str] | None = None) -> int:
    from common.config import load_run_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluation.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/evaluation_seeds.png"))
    args = parser.parse_args(argv)
    t0 = time.time()
    dirs = evaluation_federation()
    cfg = load_run_config(PRESETS / "evaluation.toml", cache_dir=str((WORK / "cache").resolve()))
    previous = earlier_results(args.out, budget(cfg))
    results = {
        "command": command("evaluation", argv),
        **machine(),
        "federation": {
            "seed": EVALUATION_SEED,
            "sites": SITES,
            "patients": PATIENTS,
            "difficulty": DIFFICULTY,
        },
        "budget": budget(cfg),
        "seeds": previous.get("seeds", {}),
    }
    for seed in args.seeds:
        if str(seed) in results["seeds"]:
            continue  # a cut run continues where it stopped
        run = run_seed(seed, dirs)
        results["seeds"][str(seed)] = {k: run[k] for k in ("pooled-patient-level", "table", "total-seconds")}
        write_json(args.out, results)
    results["floors"] = floors(cfg, dirs)
    results["seconds"] = round(time.time() - t0)
    write_json(args.out, results)
    print(table(results))
    print(rates_table(results))
    plot(results, args.plot)
    print(f"floors on the test hips: {results['floors']}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
