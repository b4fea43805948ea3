"""Can the federated model learn to order stage I below stage II? Tuning seed 101's validation hips only.

On tuning seed 101 the federated model (today's default: attention fusion, FedAvg, cosine 16 x 2)
orders stage I against stage II at a pairwise AUROC of 0.38, below chance, where the same budget
trained centralized reaches 0.62 and a radiomics model 0.65 (``bench_decision``): no decision rule
can mend that. Candidates, each one federated run over the default that changes one thing:
plain fusion (the exploratory run of 2026-12-03 ordered I vs II at 0.53; this one is scored under
the rule below like the rest), FedProx (mu 0.01), FedBN (normalisation layers stay at the sites),
and ordinal terms beside the cross entropy (``stage-ordinal-weight = 1``,
``common.training.losses``). Per candidate, on the 340 validation hips the sites' delivered models
score: the macro AUROC, the pairwise AUROC of each pair of neighbouring stages, per-stage recall,
its I-II difference from the default with a paired patient-level bootstrap interval, and the
swing of the pooled validation AUROC over the last three rounds.

The rule, fixed before any candidate ran (2026-12-03 23:55 UTC): a candidate replaces the default
if its I-II AUROC exceeds the default's by at least 0.10 with a 95% paired interval above zero, its
macro AUROC is at most 0.02 below the default's, its swing over the last three rounds is at most
0.03 and its last-round stage II recall at least 0.2 (``bench_convergence``'s bounds); among those,
the highest I-II AUROC. If none passes, the default stays and the table says so.

Usage (from the repository root; reuses ``bench_convergence``'s federation and its ``cosine-16x2``
run; about 8 min per candidate on 2 cores):
    .venv/bin/python -m benchmarks.bench_stage_order

Writes ``benchmarks/results/stage_order.json`` (candidates already in it are kept, so a cut run
continues) and ``docs/stage_order.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_convergence import CANDIDATES as SCHEDULES
from benchmarks.bench_convergence import SEED, config, federation, staging_rounds, summarise
from benchmarks.harness import command, delivered_federated, machine, markdown, write_json

DEFAULT = "cosine-16x2"  # today's default, as bench_convergence names its run
CANDIDATES: dict[str, dict] = {  # name -> run-config changes over the default
    DEFAULT: {},
    "plain-fusion": {"fusion": "plain"},
    "fedprox": {"strategy": "fedprox", "proximal_mu": 0.01},
    "fedbn": {"fedbn": True},
    "ordinal": {"stage_ordinal_weight": 1.0},
}
MIN_GAIN, MAX_MACRO_LOSS, MAX_SWING, MIN_RECALL_II = 0.10, 0.02, 0.03, 0.2  # the rule in the docstring
PAIRS = ("I-II", "II-III", "III-IV")


def i_ii(probs: np.ndarray, labels: np.ndarray) -> float:
    from common.training.metrics import adjacent_stage_aurocs

    return adjacent_stage_aurocs(probs, labels)["I-II"]


def measure(name: str, dirs: list[Path], default_scores):
    """One candidate's run (made unless there), scored on the validation hips: (figures, scores)."""
    from common.evaluate import macro
    from common.training.metrics import adjacent_stage_aurocs

    cfg = config(name, {**SCHEDULES[DEFAULT], **CANDIDATES[name]})
    trained, t0 = not (cfg.run_dir / "final_model.npz").is_file(), time.time()
    scored = delivered_federated(cfg, dirs, "val")  # trains unless the run's final model is there
    seconds = time.time() - t0  # only meaningful when this call trained it
    labels = scored.labels.astype(np.int64)
    predicted = scored.probs.argmax(1)
    rounds = summarise(staging_rounds(cfg.run_dir), seconds)  # per-round validation figures
    figures = {
        "macro-auroc": round(macro(scored.probs, labels), 4),
        "adjacent-auroc": {k: round(v, 4) for k, v in adjacent_stage_aurocs(scored.probs, labels).items()},
        "recall": [round(float((predicted[labels == c] == c).mean()), 3) for c in range(4)],
        "swing-last-3": rounds["swing-last-3"],
        "recall-stage-II-last": rounds["recall-stage-II-last"],
        "val-macro-auroc": rounds["val-macro-auroc"],
        "seconds": round(seconds) if trained else None,
    }
    if default_scores is not None:
        paired = scored.versus(default_scores, statistic=i_ii)
        figures["I-II-minus-default"] = {
            "difference": round(paired["difference"], 4),
            "ci95": [round(v, 4) for v in paired["ci95"]],
            "p": round(paired["p"], 4),
        }
    return figures, scored


def choose(runs: dict) -> str:
    """The docstring's rule: the default unless a candidate passes every bound."""
    base = runs[DEFAULT]
    passing = {
        name: r
        for name, r in runs.items()
        if name != DEFAULT
        and r["adjacent-auroc"]["I-II"] >= base["adjacent-auroc"]["I-II"] + MIN_GAIN
        and r["I-II-minus-default"]["ci95"][0] > 0
        and r["macro-auroc"] >= base["macro-auroc"] - MAX_MACRO_LOSS
        and r["swing-last-3"] <= MAX_SWING
        and r["recall-stage-II-last"] >= MIN_RECALL_II
    }
    return max(passing, key=lambda name: passing[name]["adjacent-auroc"]["I-II"]) if passing else DEFAULT


def table(runs: dict) -> str:
    rows = []
    for name, r in runs.items():
        paired = r.get("I-II-minus-default")
        versus = (
            f"{paired['difference']:+.3f} ({paired['ci95'][0]:+.3f} to {paired['ci95'][1]:+.3f})"
            if paired
            else ""
        )
        rows.append(
            [name, f"{r['macro-auroc']:.3f}"]
            + [f"{r['adjacent-auroc'][k]:.3f}" for k in PAIRS]
            + [
                versus,
                " / ".join(f"{v:.2f}" for v in r["recall"]),
                f"{r['swing-last-3']:.3f}",
                str(r["seconds"] or "-"),
            ]
        )
    header = ["candidate", "val macro AUROC", "I-II", "II-III", "III-IV", "I-II minus default (95% CI)"]
    return markdown(header + ["recall I / II / III / IV", "swing, last 3", "s"], rows)


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(runs)
    for i, (name, r) in enumerate(runs.items()):
        ax.bar(np.arange(len(PAIRS)) + i * width, [r["adjacent-auroc"][k] for k in PAIRS], width, label=name)
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_xticks(np.arange(len(PAIRS)) + 0.4 - width / 2, [f"stage {k}" for k in PAIRS])
    ax.set(
        ylabel="pairwise AUROC (validation hips)",
        ylim=(0, 1),
        title=f"Tuning seed {SEED}: ordering neighbours",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stage_order.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/stage_order.png"))
    args = parser.parse_args(argv)
    dirs = federation()
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = {
        "command": command("bench_stage_order", argv),
        **machine(),
        "federation": {"seed": SEED, "split": "val", "default": {**SCHEDULES[DEFAULT]}},
        "candidates": CANDIDATES,
        "runs": previous.get("runs", {}),
    }
    default_figures, default_scores = measure(DEFAULT, dirs, None)  # its scores pair the others'
    results["runs"].setdefault(DEFAULT, default_figures)
    for name in args.candidates:
        if name in results["runs"]:
            continue  # a cut run continues where it stopped
        figures, _ = measure(name, dirs, default_scores)
        results["runs"][name] = figures
        write_json(args.out, results)
        print(f"{name}: {figures}", flush=True)
    results["chosen"] = choose(results["runs"])
    write_json(args.out, results)
    print(table(results["runs"]))
    print(
        f"chosen by the rule: {results['chosen']}"
        + (" (the default stays)" if results["chosen"] == DEFAULT else "")
    )
    plot(results["runs"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
