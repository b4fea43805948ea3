"""Does the federated staging phase converge? Candidate schedules on a tuning federation's validation hips.

The federated model's pooled validation AUROC swung between rounds and it called almost every
stage II hip stage I. This benchmark chooses the fix, on tuning data only: a federation shaped
like the evaluation federation (5 sites x 100 patients, clinical phantom, 30 % of each site's
patients for training) but written from tuning seed 101, with 60 % of its patients as validation
hips (about 350) so that a round's pooled validation AUROC is measured to about +-0.02, not +-0.05.
Each candidate is one federated run (both phases, the main job's pretraining) that changes only
the staging phase's schedule or the server's aggregation, at no more local training than the
main job's 8 rounds x 4 epochs. Per candidate: the pooled validation macro AUROC of every staging
round, its swing over the last three rounds (max - min), the stage II recall of the last round,
the best round, and the seconds.

The rule, fixed before any candidate ran: among the candidates whose swing over the last three
rounds is at most 0.03 and whose last-round stage II recall is at least 0.2, the highest mean
validation AUROC over the last three rounds; within 0.01 of it, the cheaper one. If none passes,
none becomes the default and the table says so. The same rule, among the server optimisers (FedAvgM,
FedAdam over the chosen schedule), picks the one ``benchmarks.evaluation_strategies`` compares with
FedAvg on the evaluation federation.

Usage (from the repository root; about 8 min per candidate on 2 cores):
    .venv/bin/python -m benchmarks.bench_convergence
    .venv/bin/python -m benchmarks.bench_convergence --candidates constant-8x4 cosine-8x4

Writes ``benchmarks/results/convergence.json`` (rewritten after every run; candidates already in
it are kept, so a cut run continues) and ``docs/convergence.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.evaluation import PATIENTS, SITES, tuning_seed
from benchmarks.harness import (
    PRESETS,
    command,
    machine,
    markdown,
    quiet_progress,
    run_fresh,
    site_dirs,
    write_json,
)

SEED = tuning_seed(101)
WORK = Path("/tmp/onfh-bench/convergence")
# The evaluation federation's training share; the held-out share goes to validation, since on a
# tuning seed the validation hips are what a choice may look at.
SPLIT = "0.3,0.6,0.1"
LAST = 3  # rounds over which the swing is measured
MAX_SWING, MIN_RECALL_II, NEAR = 0.03, 0.2, 0.01  # the rule in the docstring

CANDIDATES: dict[str, dict] = {  # name -> run-config overrides of presets/evaluation.toml
    "constant-8x4": {},  # the main job's schedule until now
    "cosine-8x4": {"stage_lr_schedule": "cosine"},
    "constant-16x2": {"stage_rounds": 16, "stage_epochs": 2},
    "cosine-16x2": {"stage_rounds": 16, "stage_epochs": 2, "stage_lr_schedule": "cosine"},
    # Server optimisers over the chosen schedule (secure aggregation reveals the mean they step from):
    # the rule picks, among these, the one the evaluation federation compares with FedAvg.
    "fedavgm-cosine-16x2": {
        "stage_rounds": 16,
        "stage_epochs": 2,
        "stage_lr_schedule": "cosine",
        "strategy": "fedavgm",
    },
    "fedadam-cosine-16x2": {
        "stage_rounds": 16,
        "stage_epochs": 2,
        "stage_lr_schedule": "cosine",
        "strategy": "fedadam",
    },
}
SERVER_OPTIMISERS = tuple(name for name, overrides in CANDIDATES.items() if "strategy" in overrides)
SCHEDULES = tuple(name for name in CANDIDATES if name not in SERVER_OPTIMISERS)


def federation() -> list[Path]:
    """The tuning federation's site folders, written (or reused) and their caches filled."""
    from simulation.main_job import preprocess_sites
    from simulation.synth.federation import generate_federation

    generate_federation(WORK / "federation", sites=SITES, patients=PATIENTS, seed=SEED, difficulty="clinical")
    dirs = site_dirs(WORK / "federation")
    preprocess_sites(config("preprocess", {}), dirs)
    return dirs


def config(name: str, overrides: dict):
    from common.config import load_run_config

    return load_run_config(
        PRESETS / "evaluation.toml",
        split_fractions=SPLIT,
        data_root=str((WORK / "federation").resolve()),
        cache_dir=str((WORK / "cache").resolve()),
        output_dir=str((WORK / "runs").resolve()),
        run_name=name,
        **overrides,
    )


def staging_rounds(run_dir: Path) -> list[dict]:
    """The staging phase's lines of a run's ``metrics.jsonl``, in round order."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return sorted((line for line in lines if line["phase"] == "stage"), key=lambda line: line["round"])


def summarise(rounds: list[dict], seconds: float) -> dict:
    """Per-round validation AUROC and stage II recall, and what the choice looks at."""
    pooled = [r["evaluate"] for r in rounds]  # the round's pooled validation summary
    auroc = [round(float(v["macro-auroc"]), 4) for v in pooled]
    recall_ii = [round(float(v.get("sensitivity-stage-2", float("nan"))), 4) for v in pooled]
    best = int(np.argmax(auroc))
    return {
        "val-macro-auroc": auroc,
        "val-recall-stage-II": recall_ii,
        "last": auroc[-1],
        "best": auroc[best],
        "best-round": best + 1,
        "swing-last-3": round(max(auroc[-LAST:]) - min(auroc[-LAST:]), 4),
        "mean-last-3": round(float(np.mean(auroc[-LAST:])), 4),
        "recall-stage-II-last": recall_ii[-1],
        "seconds": round(seconds),
    }


def choose(runs: dict, among: tuple[str, ...]) -> str | None:
    """The docstring's rule among the candidates ``among``: the passing candidate with the best late
    mean, the cheaper if near."""
    passing = {
        name: r
        for name, r in runs.items()
        if name in among and r["swing-last-3"] <= MAX_SWING and r["recall-stage-II-last"] >= MIN_RECALL_II
    }
    if not passing:
        return None
    top = max(r["mean-last-3"] for r in passing.values())
    near = [name for name, r in passing.items() if r["mean-last-3"] >= top - NEAR]
    return min(near, key=lambda name: passing[name]["seconds"])


def table(runs: dict) -> str:
    rows = [
        [
            name,
            f"{r['mean-last-3']:.3f}",
            f"{r['swing-last-3']:.3f}",
            f"{r['last']:.3f}",
            f"{r['best']:.3f} (round {r['best-round']})",
            f"{r['recall-stage-II-last']:.2f}",
            str(r["seconds"]),
        ]
        for name, r in runs.items()
    ]
    header = [
        "candidate",
        "val AUROC, mean of last 3",
        "swing, last 3",
        "last",
        "best",
        "stage II recall, last",
        "s",
    ]
    return markdown(header, rows)


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in runs.items():
        for ax, key in zip(axes, ("val-macro-auroc", "val-recall-stage-II"), strict=True):
            ax.plot(range(1, len(r[key]) + 1), r[key], marker="o", ms=3, label=name)
    axes[0].set(xlabel="staging round", ylabel="pooled validation macro AUROC", title=f"Tuning seed {SEED}")
    axes[1].set(xlabel="staging round", ylabel="stage II recall (validation)", ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/convergence.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/convergence.png"))
    args = parser.parse_args(argv)
    quiet_progress()
    dirs = federation()
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = {
        "command": command("bench_convergence", argv),
        **machine(),
        "federation": {"seed": SEED, "sites": SITES, "patients": PATIENTS, "split": SPLIT},
        "candidates": {
            name: CANDIDATES[name] for name in {**previous.get("runs", {}), **dict.fromkeys(args.candidates)}
        },
        "runs": previous.get("runs", {}),
    }
    for name in args.candidates:
        if name in results["runs"]:
            continue  # a cut run continues where it stopped
        cfg = config(name, CANDIDATES[name])
        _, seconds = run_fresh(cfg, len(dirs))
        results["runs"][name] = summarise(staging_rounds(cfg.run_dir), seconds)
        write_json(args.out, results)
        print(f"{name}: {results['runs'][name]}", flush=True)
    results["chosen"] = choose(results["runs"], SCHEDULES)
    results["server-optimiser"] = choose(results["runs"], SERVER_OPTIMISERS)
    write_json(args.out, results)
    print(table(results["runs"]))
    print(f"schedule chosen by the rule: {results['chosen'] or 'none passes; the default stays'}")
    print(f"server optimiser chosen by the rule: {results['server-optimiser'] or 'none passes'}")
    plot(results["runs"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
