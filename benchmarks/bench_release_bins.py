"""Release bins: the pooled AUROC from binned score histograms against the exact AUROC.

A site releases its scores only as per-class histograms of at most ``max-release-bins`` bins
(``client.policy.ReleaseBounds``); the server computes the pooled AUROC from the summed counts,
a positive and a negative in the same bin counting as half a correct pair
(``common.training.metrics.auroc_from_histograms``). This measures what the binning costs: on
synthetic score sets, the AUROC from ``score_histograms`` (on the sites' score grid,
``common.training.score_bins``: half probability, half log-odds) at 5, 10, 20, 50, 100 and 1000 bins
(and two sites at 10 and 20 bins, pooled by ``common.training.evaluation.pool_histograms``)
minus scikit-learn's exact ``roc_auc_score`` on the same scores.

Score sets (``--hips`` pooled hips each, ``--seeds`` draws): one-vs-rest scores of one class
from Beta distributions (30% positives): soft ones in mid-range, confident ones piled at 0 and
1 (separated, and overlapping: some confident mistakes), and a rare stage whose scores all sit
near 0; and the macro AUROC of 4-class softmax outputs, soft (temperature 1) and confident
(temperature 0.15).

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_release_bins            # 400 hips, 200 draws per set
    .venv/bin/python -m benchmarks.bench_release_bins --quick    # 20 draws

Prints a table (mean bias, and the largest absolute error over the draws) and writes
``benchmarks/results/release_bins.json`` (``release_bins_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.harness import command, machine, markdown, write_json
from common.training.evaluation import pool_histograms
from common.training.metrics import auroc_from_histograms, score_histograms

BINS = (5, 10, 20, 50, 100, 1000)
MIXED = (10, 20)  # two sites, each half of the hips, released at these bins
POSITIVES = 0.3  # share of positives in the one-class score sets


def _beta(rng: np.random.Generator, n: int, parts: list[tuple[float, float, float]]) -> np.ndarray:
    """``n`` draws from a mixture of Beta distributions ``(weight, a, b)``."""
    which = rng.choice(len(parts), size=n, p=[w for w, _, _ in parts])
    return np.array([rng.beta(parts[k][1], parts[k][2]) for k in which])


def _one_class(pos: list, neg: list) -> Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]:
    """A score set of one class as 4-class probabilities ``[s, 1 - s, 0, 0]``, labels 0 (positive) / 1."""

    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        n_pos = int(round(n * POSITIVES))
        scores = np.concatenate([_beta(rng, n_pos, pos), _beta(rng, n - n_pos, neg)])
        labels = np.concatenate([np.zeros(n_pos, int), np.ones(n - n_pos, int)])
        probs = np.zeros((n, 4))
        probs[:, 0], probs[:, 1] = scores, 1.0 - scores
        return probs, labels

    return draw


def _softmax(temperature: float) -> Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]:
    """4-class softmax outputs of noisy logits (true class +1.5), sharpened by ``1 / temperature``."""

    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 4, n)
        logits = (rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[labels]) / temperature
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True), labels

    return draw


# name -> (what is scored, draw); "class" cases score class 0, "macro" cases all four classes.
CASES = {
    "soft (Beta 3,2 vs 2,3)": ("class", _one_class([(1.0, 3, 2)], [(1.0, 2, 3)])),
    "confident, separated (Beta 4,0.4 vs 0.4,4)": ("class", _one_class([(1.0, 4, 0.4)], [(1.0, 0.4, 4)])),
    "confident, 20-25% confident mistakes": (
        "class",
        _one_class([(0.75, 4, 0.3), (0.25, 0.3, 4)], [(0.8, 0.3, 4), (0.2, 4, 0.3)]),
    ),
    "rare stage, all scores near 0 (Beta 0.8,4 vs 0.3,6)": (
        "class",
        _one_class([(1.0, 0.8, 4)], [(1.0, 0.3, 6)]),
    ),
    "4-class softmax, soft (T = 1), macro": ("macro", _softmax(1.0)),
    "4-class softmax, confident (T = 0.15), macro": ("macro", _softmax(0.15)),
}


def exact_auroc(kind: str, probs: np.ndarray, labels: np.ndarray) -> float:
    classes = [0] if kind == "class" else range(4)
    return float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in classes]))


def binned_auroc(kind: str, hist: np.ndarray) -> float:
    result = auroc_from_histograms(hist)
    return float(result["per_class_auroc"][0]) if kind == "class" else float(result["macro_auroc"])


def measure(hips: int, seeds: int) -> dict:
    """Per case: the exact AUROC and, per grid, the binned AUROC minus it over ``seeds`` draws."""
    grids = [str(b) for b in BINS] + [f"{MIXED[0]}+{MIXED[1]}"]
    results = {}
    for name, (kind, draw) in CASES.items():
        exact, errors = [], {g: [] for g in grids}
        for seed in range(seeds):
            probs, labels = draw(np.random.default_rng(seed), hips)
            if kind == "macro" and len(set(labels.tolist())) < 4:
                continue
            truth = exact_auroc(kind, probs, labels)
            exact.append(truth)
            for bins in BINS:
                errors[str(bins)].append(binned_auroc(kind, score_histograms(probs, labels, bins)) - truth)
            half = hips // 2  # two sites at different release bins, pooled on the finer grid
            pooled = pool_histograms(
                [
                    score_histograms(probs[:half], labels[:half], MIXED[0]).ravel(),
                    score_histograms(probs[half:], labels[half:], MIXED[1]).ravel(),
                ]
            )
            errors[grids[-1]].append(binned_auroc(kind, pooled) - truth)
        results[name] = {
            "scored": "class 0 one-vs-rest" if kind == "class" else "macro over 4 classes",
            "draws": len(exact),
            "exact-auroc-mean": float(np.mean(exact)),
            "bias": {g: float(np.mean(e)) for g, e in errors.items()},
            "mean-abs-error": {g: float(np.mean(np.abs(e))) for g, e in errors.items()},
            "max-abs-error": {g: float(np.max(np.abs(e))) for g, e in errors.items()},
        }
    return results


def table(results: dict) -> str:
    grids = list(next(iter(results.values()))["bias"])
    header = ["score set", "exact AUROC", *[f"{g} bins" for g in grids]]
    rows = [
        [
            name,
            f"{r['exact-auroc-mean']:.3f}",
            *[f"{r['bias'][g]:+.4f} ({r['max-abs-error'][g]:.4f})" for g in grids],
        ]
        for name, r in results.items()
    ]
    return markdown(header, rows)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the figures written to the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hips", type=int, default=400, help="pooled hips per score set")
    parser.add_argument("--seeds", type=int, default=200, help="draws per score set")
    parser.add_argument("--quick", action="store_true", help="20 draws")
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    args = parser.parse_args(argv)
    out = args.out or Path(f"benchmarks/results/release_bins{'_quick' if args.quick else ''}.json")
    seeds = 20 if args.quick else args.seeds
    figures = {"command": command("bench_release_bins", argv), **machine(), "hips": args.hips, "seeds": seeds}
    started = time.perf_counter()
    figures["results"] = measure(args.hips, seeds)
    figures["seconds"] = time.perf_counter() - started
    print(table(figures["results"]))
    print("cells: mean of (binned - exact) AUROC over the draws, (largest |binned - exact|)")
    write_json(out, figures)
    return figures


if __name__ == "__main__":
    sys.exit(main() and 0)
