"""Federated evaluation without per-patient scores leaving a site.

A site turns its predictions into aggregate counts (per-class score histograms and a confusion
matrix); the server sums the counts of all sites and computes pooled metrics from the sums.
How coarse a site's histograms are, and below how many hips it releases nothing, is the site's
own policy (``client.policy.ReleaseBounds``); sites that release different bin counts are pooled
on the finest of their grids (:func:`pool_histograms`).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score

from common.config import STAGES
from common.training.metrics import auroc_from_histograms, score_histograms

N_CLASSES = len(STAGES)


def site_evaluation(probs: np.ndarray, labels: np.ndarray, bins: int) -> dict[str, float | list[float]]:
    """Aggregate-only evaluation record of one site.

    Args:
        probs: ``(N, 4)`` stage probabilities of the site's held-out hips.
        labels: ``(N,)`` class indices (stage - 1).
        bins: histogram bins of the score grid (:mod:`common.training.score_bins`; finer bins,
            AUROC closer to the exact value).
    Returns:
        ``num-examples``, ``score-histogram`` (flattened ``(4, 2, bins)`` counts),
        ``confusion`` (flattened ``4 x 4`` counts, rows = true stage), and the site's own
        ``macro-auroc`` and ``accuracy`` (NaN-free: -1 when undefined).
    """
    hist = score_histograms(probs, labels, bins=bins)
    pred = probs.argmax(axis=1)
    confusion = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    site_auroc = auroc_from_histograms(hist)["macro_auroc"]
    return {
        "num-examples": int(len(labels)),
        "score-histogram": hist.astype(np.float64).ravel().tolist(),
        "confusion": confusion.astype(np.float64).ravel().tolist(),
        "macro-auroc": float(site_auroc) if np.isfinite(site_auroc) else -1.0,
        "accuracy": float((pred == labels).mean()) if len(labels) else -1.0,
    }


def rebin_histograms(hist: np.ndarray, bins: int) -> np.ndarray:
    """``(C, 2, b)`` counts moved onto the score grid of ``bins`` bins (float64).

    Both grids are equal bins of the bin coordinate ``t`` on [0, 1] (:mod:`common.training.score_bins`).
    Each old bin's count is shared among the new bins in proportion to their overlap with it in
    ``t``: the identity when ``b == bins``, exact sums when ``bins`` divides ``b``, and an even
    spread of each count over its own interval of ``t`` when the new grid is finer.
    """
    hist = np.asarray(hist, dtype=np.float64)
    old = np.linspace(0.0, 1.0, hist.shape[-1] + 1)  # edges in t, not in probability
    new = np.linspace(0.0, 1.0, bins + 1)
    overlap = np.clip(
        np.minimum(old[1:, None], new[None, 1:]) - np.maximum(old[:-1, None], new[None, :-1]), 0.0, None
    )
    share = overlap / np.diff(old)[:, None]  # (b, bins): rows sum to 1
    return hist @ share


def pool_histograms(histograms: list) -> np.ndarray:
    """The sum of the sites' flattened ``(4, 2, b)`` score histograms, on the finest grid among them.

    Sites may release different bin counts (each coarsens to its own policy's ``max-release-bins``);
    a coarser site's counts are spread over the finer bins (:func:`rebin_histograms`). When every
    site releases the same bins, as under one shared policy, this is the plain sum.
    """
    shaped = [np.asarray(h, dtype=np.float64).reshape(N_CLASSES, 2, -1) for h in histograms]
    if not shaped:
        raise ValueError("pool_histograms: no histogram to pool")
    bins = max(h.shape[-1] for h in shaped)
    return sum(h if h.shape[-1] == bins else rebin_histograms(h, bins) for h in shaped)


def pooled_staging_metrics(histogram_sum: np.ndarray, confusion_sum: np.ndarray) -> dict[str, float]:
    """Pooled metrics from the summed site records (flattened or shaped arrays)."""
    hist = np.asarray(histogram_sum, dtype=np.float64).reshape(N_CLASSES, 2, -1)
    confusion = np.asarray(confusion_sum, dtype=np.float64).reshape(N_CLASSES, N_CLASSES).round().astype(int)
    aurocs = auroc_from_histograms(hist)
    out: dict[str, float] = {"macro-auroc": float(aurocs["macro_auroc"])}
    for i, stage in enumerate(STAGES):
        value = aurocs["per_class_auroc"][i]
        out[f"auroc-stage-{stage}"] = float(value) if value is not None and np.isfinite(value) else -1.0
    n = int(confusion.sum())
    out["n-hips"] = float(n)
    if n:
        # Expand the counts into (true, predicted) pairs so scikit-learn computes the metrics.
        true_idx, pred_idx = np.nonzero(confusion)
        counts = confusion[true_idx, pred_idx]
        y_true, y_pred = np.repeat(true_idx, counts), np.repeat(pred_idx, counts)
        out["accuracy"] = float((y_true == y_pred).mean())
        out["balanced-accuracy"] = float(balanced_accuracy_score(y_true, y_pred))
        kappa = cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=list(range(N_CLASSES)))
        out["qw-kappa"] = float(kappa) if np.isfinite(kappa) else 0.0
    sensitivity, specificity = stage_rates(confusion)
    for stage, sens, spec in zip(STAGES, sensitivity, specificity, strict=True):
        # -1 where undefined (no hip of the stage, or none of another), as for the per-stage AUROC
        out[f"sensitivity-stage-{stage}"] = float(sens) if np.isfinite(sens) else -1.0
        out[f"specificity-stage-{stage}"] = float(spec) if np.isfinite(spec) else -1.0
    out["confusion"] = confusion.ravel().tolist()  # type: ignore[assignment]
    return out


def stage_rates(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-stage sensitivity (recall) and specificity, one-vs-rest, from a confusion matrix (rows:
    true stage, columns: predicted; pooled counts do). NaN where a stage has no hip, or no other."""
    confusion = np.asarray(confusion, dtype=np.float64).reshape(N_CLASSES, N_CLASSES)
    true, called, hits = confusion.sum(axis=1), confusion.sum(axis=0), np.diag(confusion)
    negatives = confusion.sum() - true
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / true, (negatives - (called - hits)) / negatives


def _histogram_aurocs(negatives: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """AUROC of each row of paired score histograms ``(R, bins)`` (ties in a bin count one half)."""
    below = np.cumsum(negatives, axis=1) - negatives
    pairs = negatives.sum(axis=1) * positives.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (positives * (below + 0.5 * negatives)).sum(axis=1) / pairs


def histogram_intervals(
    histogram_sum: np.ndarray, reps: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% intervals of the per-stage and macro AUROC from pooled score histograms alone.

    What the server can compute: each stage's positive and negative histograms are resampled hip by
    hip (multinomial, their own totals kept), and a draw's macro AUROC is the mean of its stages'.
    Two hips of one patient, and one hip's four scores, move independently here, so the interval is
    narrower than one that resamples patients (``onfh evaluate`` at a site computes that one).
    """
    hist = np.asarray(histogram_sum, dtype=np.float64).reshape(N_CLASSES, 2, -1).round().astype(np.int64)
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[float, float]] = {}
    draws = []
    for stage, (negatives, positives) in zip(STAGES, hist, strict=True):
        if negatives.sum() == 0 or positives.sum() == 0:
            continue
        auc = _histogram_aurocs(
            rng.multinomial(negatives.sum(), negatives / negatives.sum(), reps).astype(np.float64),
            rng.multinomial(positives.sum(), positives / positives.sum(), reps).astype(np.float64),
        )
        draws.append(auc)
        out[f"auroc-stage-{stage}"] = (float(np.percentile(auc, 2.5)), float(np.percentile(auc, 97.5)))
    if draws:
        macro = np.mean(draws, axis=0)
        out["macro-auroc"] = (float(np.percentile(macro, 2.5)), float(np.percentile(macro, 97.5)))
    return out
