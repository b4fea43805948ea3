"""Staging metrics (AUROC, kappa, bootstrap CI, histogram AUROC for the federation) and translation metrics."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from scipy.stats import mannwhitneyu, rankdata
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    roc_auc_score,
)

from common.config import STAGE_NAMES
from common.training.score_bins import bin_coordinate

N_CLASSES = 4  # ARCO I-IV, class index = stage - 1


def _check_staging_inputs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise ValueError(f"expected probs (N, C) and labels (N,), got {probs.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(
            f"labels must be class indices 0..{probs.shape[1] - 1} (stage - 1), got {sorted(set(labels))}"
        )
    return probs, labels


def one_vs_rest_aurocs(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each class's one-vs-rest AUROC, float64 ``(C,)``, NaN where the class or its complement is absent.

    The Mann-Whitney U from average ranks over ``n_pos * n_neg``: equal to scikit-learn's
    ``roc_auc_score`` (ties count half; tested to 1e-12) and about 40 times faster, which the
    1000-draw patient bootstraps feel.
    """
    probs, labels = _check_staging_inputs(probs, labels)
    ranks = rankdata(probs, axis=0)
    out = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        positive = labels == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos and n_neg:
            out[c] = (ranks[positive, c].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def adjacent_stage_aurocs(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How well the scores order each pair of neighbouring stages, among the hips of those two stages.

    For stages ``a`` and ``b = a + 1``: the AUROC of ``log p_b - log p_a`` with the stage-``b`` hips
    as positives (a pairwise AUROC after Hand and Till 2001, scored by the log-ratio of the two
    stages' probabilities so that it reads the same from either side). 0.5 is
    chance; below 0.5 the model orders the pair backwards, which no decision threshold mends.
    Keys ``"I-II"``, ``"II-III"``, ``"III-IV"``; NaN where either stage is absent.
    """
    probs, labels = _check_staging_inputs(probs, labels)
    log_p = np.log(np.clip(probs, 1e-300, None))
    out = {}
    for a in range(probs.shape[1] - 1):
        pair = (labels == a) | (labels == a + 1)
        score = (log_p[pair, a + 1] - log_p[pair, a])[:, None]
        out[f"{STAGE_NAMES[a]}-{STAGE_NAMES[a + 1]}"] = float(
            one_vs_rest_aurocs(np.hstack([-score, score]), (labels[pair] == a + 1).astype(np.int64))[1]
        )
    return out


def per_class_auroc(probs: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """One-vs-rest AUROC of each class; None where the class or its complement is absent."""
    return [None if np.isnan(v) else float(v) for v in one_vs_rest_aurocs(probs, labels)]


def macro_auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean one-vs-rest AUROC over the classes present in ``labels`` (NaN if fewer than two are)."""
    values = [v for v in per_class_auroc(probs, labels) if v is not None]
    return float(np.mean(values)) if values else float("nan")


def bootstrap_macro_auroc_ci(
    probs: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the macro AUROC, resampling hips within each class (stratified).

    Stratification keeps every resample's class counts equal to the test set's, so no
    resample loses a class and none is degenerate; non-finite values would be skipped. Each
    class's one-vs-rest AUROC is scipy's Mann-Whitney U / (n_pos * n_neg), vectorised over the
    resamples (identical to ``roc_auc_score``, ties counted half). Returns
    ``(nan, nan)`` when fewer than two classes are present.
    """
    probs, labels = _check_staging_inputs(probs, labels)
    present = np.unique(labels)
    if present.size < 2 or n_boot < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    # (n_boot, n_c) resampled hip indices per class; stratified, so sizes are fixed per class.
    resampled = {
        c: rng.choice(np.flatnonzero(labels == c), size=(n_boot, int((labels == c).sum()))) for c in present
    }
    per_class = []
    for c in present:
        positives = probs[resampled[c], c]
        negatives = probs[np.concatenate([resampled[o] for o in present if o != c], axis=1), c]
        # Mann-Whitney U / (n_pos * n_neg) is the AUROC (ties count half), vectorised over resamples.
        u = mannwhitneyu(positives, negatives, axis=1, method="asymptotic", use_continuity=False).statistic
        per_class.append(u / (positives.shape[1] * negatives.shape[1]))
    values = np.mean(per_class, axis=0)
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def staging_metrics(probs: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """All staging metrics of one test set.

    Args:
        probs: ``(N, 4)`` class probabilities (softmax of the logits).
        labels: ``(N,)`` class indices (stage - 1).
        n_boot: bootstrap resamples for the macro-AUROC CI (0 skips it).
        seed: bootstrap seed.

    Returns:
        dict with ``macro_auroc`` (primary: mean one-vs-rest AUROC over the stages present in
        ``labels``, listed in ``auroc_stages``), ``macro_auroc_ci`` ``[low, high]`` (95 %
        stratified bootstrap), ``per_stage_auroc`` ``{"1": ..., "4": ...}`` (None for a stage
        absent from the labels), ``accuracy``, ``balanced_accuracy`` (mean recall over present
        stages), ``qwk`` (quadratic weighted Cohen kappa; NaN if undefined), ``confusion_matrix``
        (4x4 nested list, rows = true stage, columns = predicted), ``n_samples``.
    """
    probs, labels = _check_staging_inputs(probs, labels)
    n_classes = probs.shape[1]
    per_class = per_class_auroc(probs, labels)
    predictions = probs.argmax(axis=1)
    with warnings.catch_warnings():
        # sklearn warns (and returns NaN or a partial score) on degenerate label sets; we report it as is.
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(labels, predictions)) if labels.size else float("nan")
        qwk = float(
            cohen_kappa_score(labels, predictions, labels=list(range(n_classes)), weights="quadratic")
        )
    low, high = bootstrap_macro_auroc_ci(probs, labels, n_boot=n_boot, seed=seed)
    return {
        "macro_auroc": macro_auroc(probs, labels),
        "macro_auroc_ci": [low, high],
        "auroc_stages": [c + 1 for c, v in enumerate(per_class) if v is not None],
        "per_stage_auroc": {str(c + 1): v for c, v in enumerate(per_class)},
        "accuracy": float(accuracy_score(labels, predictions)) if labels.size else float("nan"),
        "balanced_accuracy": balanced,
        "qwk": qwk,
        "confusion_matrix": confusion_matrix(labels, predictions, labels=list(range(n_classes))).tolist(),
        "n_samples": int(labels.size),
    }


def score_histograms(probs: np.ndarray, labels: np.ndarray, bins: int = 1000) -> np.ndarray:
    """Per-class score histograms a site can share instead of per-patient scores.

    Returns int64 counts ``(C, 2, bins)``: for class c, ``[0]`` histograms ``probs[:, c]`` of the
    hips that are not class c (negatives) and ``[1]`` of those that are (positives), on the score
    grid of :mod:`common.training.score_bins` (equal bins in the bin coordinate ``t(p)``: half
    probability, half log-odds, so confident scores near 0 and 1 are still told apart; edges in
    probability: ``score_bins.bin_edges(bins)``). Histograms of several sites add up to the pooled
    histogram.
    """
    probs, labels = _check_staging_inputs(probs, labels)
    if bins < 2:
        raise ValueError(f"score_histograms: bins must be >= 2, got {bins}")
    coordinate = bin_coordinate(probs)
    hist = np.zeros((probs.shape[1], 2, bins), dtype=np.int64)
    for c in range(probs.shape[1]):
        positive = labels == c
        hist[c, 0] = np.histogram(coordinate[~positive, c], bins=bins, range=(0.0, 1.0))[0]
        hist[c, 1] = np.histogram(coordinate[positive, c], bins=bins, range=(0.0, 1.0))[0]
    return hist


def auroc_from_histograms(hist: np.ndarray) -> dict:
    """One-vs-rest AUROC per class from ``score_histograms`` counts (summed over sites).

    Each bin is one score level weighted by its counts (``roc_auc_score`` with
    ``sample_weight``), so a positive and a negative in the same bin count as half a correct
    pair, exactly the Mann-Whitney tie rule. Only the bins' order is used, so any grid in score
    order will do (:mod:`common.training.score_bins` defines the one sites use). The gap to the
    exact AUROC is at most half the share of positive-negative pairs that share a bin. With the
    default 1000 bins, measured over 20 draws of 200 hips (tests/common/training/test_evaluation.py):
    2.0e-4 macro (7.4e-4 per stage) at most for scores spread over [0, 1], and 8.6e-4 macro
    (3.5e-3 per stage) for a confident model whose scores crowd below 0.001 and above 0.999
    (equal bins in p lost up to 0.036 macro, 0.064 per stage, there).

    Returns ``{"per_class_auroc": [float | None] * C, "macro_auroc": mean over defined classes
    (NaN if none), "classes": class indices included}``.
    """
    hist = np.asarray(hist)
    if hist.ndim != 3 or hist.shape[1] != 2:
        raise ValueError(f"auroc_from_histograms expects (C, 2, bins) counts, got shape {hist.shape}")
    bins = hist.shape[2]
    levels = (np.arange(bins) + 0.5) / bins  # bin centres in t: only their order matters
    per_class: list[float | None] = []
    for negatives, positives in hist:
        if negatives.sum() == 0 or positives.sum() == 0:
            per_class.append(None)
            continue
        keep_neg, keep_pos = negatives > 0, positives > 0
        scores = np.concatenate([levels[keep_neg], levels[keep_pos]])
        truth = np.concatenate([np.zeros(keep_neg.sum()), np.ones(keep_pos.sum())])
        weights = np.concatenate([negatives[keep_neg], positives[keep_pos]]).astype(np.float64)
        per_class.append(float(roc_auc_score(truth, scores, sample_weight=weights)))
    defined = [v for v in per_class if v is not None]
    return {
        "per_class_auroc": per_class,
        "macro_auroc": float(np.mean(defined)) if defined else float("nan"),
        "classes": [c for c, v in enumerate(per_class) if v is not None],
    }


def translation_metrics(
    pred_norm: torch.Tensor, target_norm: torch.Tensor, ct_window_hu: tuple[float, float] = (-200.0, 1400.0)
) -> dict[str, float]:
    """MAE (HU), PSNR (dB) and SSIM of predicted vs true CT, averaged over the images.

    Args:
        pred_norm, target_norm: ``(B, 1, H, W)`` normalised HU ([-1, 1] = the CT window);
            predictions are clamped to [-1, 1] first.
        ct_window_hu: the (low, high) HU window that [-1, 1] maps to.

    PSNR uses MONAI's ``PSNRMetric`` with peak = window width (2 in normalised units); SSIM
    uses MONAI's ``SSIMMetric`` (2-D, 7x7 Gaussian window) on the images shifted to [0, 2].
    """
    low, high = ct_window_hu
    if high <= low:
        raise ValueError(f"ct_window_hu must be (low, high) with high > low, got {ct_window_hu}")
    pred = pred_norm.detach().float().clamp(-1.0, 1.0)
    target = target_norm.detach().float()
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(
            f"expected pred and target (B, 1, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    hu_per_unit = (high - low) / 2.0
    mae_hu = float((pred - target).abs().mean() * hu_per_unit)
    psnr = float(PSNRMetric(max_val=2.0)(pred, target).mean())
    win_size = min(7, pred.shape[-1], pred.shape[-2])
    ssim = float(
        SSIMMetric(spatial_dims=2, data_range=2.0, win_size=win_size)(pred + 1.0, target + 1.0).mean()
    )
    return {"mae_hu": mae_hu, "psnr": psnr, "ssim": ssim}
