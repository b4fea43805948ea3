"""The bins of the score histograms sites release: one definition for sites, server and docs.

A score (a softmax probability ``p``) is binned on its *bin coordinate*

    ``t(p) = SHARE_OF_P * p + (1 - SHARE_OF_P) * (clip(logit p, -L, L) + L) / (2 L)``,  ``L = LOGIT_LIMIT``,

a strictly increasing map of [0, 1] onto [0, 1] (``t(0) = 0``, ``t(1) = 1``). A histogram of ``B``
bins has ``B`` equal bins *in t*: bin ``b`` holds ``b / B <= t(p) < (b + 1) / B`` (the last bin
also ``t = 1``), i.e. ``bin_edges(B)[b] <= p < bin_edges(B)[b + 1]`` in probability.

Why this grid: with equal bins in ``p``, a confident model's scores crowd into the first and last
bin, where a positive and a negative tie at one half though the exact AUROC orders them (up to
0.036 of macro AUROC lost at 1000 bins). Half of ``t`` is the log-odds over [-20, 20], so no bin
is wider than ``4 L / B`` (0.08 at 1000 bins) in log-odds anywhere in that range; the other half
is ``p`` itself, so in the middle no bin is wider than about ``1.8 / B`` in probability, and a
coarse release (20 bins) still separates spread scores. A pure logit grid would put all of
``0.12 < p < 0.88`` into two of 20 bins. Scores below ``p = 2e-9`` (above ``1 - 2e-9``) share the
first (last) bin, as exact float32 softmax outputs of 0 and 1 would anyway.

Everything that reads a histogram bin by bin (the pooled AUROC, its intervals, ROC curves,
re-binning onto a finer grid) relies only on the bins being in score order and equal in ``t``;
what they cover in probability is :func:`bin_edges`. The message a site sends is unchanged by the
grid: ``B`` counts per class and side, summed as they are.
"""

from __future__ import annotations

import numpy as np

# Log-odds binned on [-20, 20] (p from 2.1e-9 to 1 - 2.1e-9): past float32 softmax's last step below 1
# (log-odds 16.6). With 16, confident float64 test scores still lost 0.004 of macro AUROC at 1000 bins;
# a wider range makes coarse grids coarser in the middle.
LOGIT_LIMIT = 20.0
SHARE_OF_P = 0.5  # share of the bin coordinate that is uniform in p (the rest is uniform in log-odds)


def bin_coordinate(probs: np.ndarray) -> np.ndarray:
    """``t(p)`` of each score (float64, same shape): bins are equal in ``t`` over [0, 1].

    Scores are clipped to [0, 1] first (a softmax rounded past 1 bins as 1); NaN stays NaN.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        log_odds = np.log(p) - np.log1p(-p)  # -inf at p = 0, +inf at p = 1: clipped below
    spread = (np.clip(log_odds, -LOGIT_LIMIT, LOGIT_LIMIT) + LOGIT_LIMIT) / (2.0 * LOGIT_LIMIT)
    return SHARE_OF_P * p + (1.0 - SHARE_OF_P) * spread


def bin_edges(bins: int) -> np.ndarray:
    """The ``bins + 1`` edges of the grid in probability (0 first, 1 last, increasing): where
    ``t(p)`` crosses ``b / bins`` (found by bisection, to float64 precision)."""
    if bins < 1:
        raise ValueError(f"bin_edges: bins must be >= 1, got {bins}")
    target = np.linspace(0.0, 1.0, bins + 1)
    low, high = np.zeros(bins + 1), np.ones(bins + 1)
    for _ in range(200):  # halves the bracket down to adjacent floats (near 0 they are ~1e-300 apart)
        mid = 0.5 * (low + high)
        below = bin_coordinate(mid) < target
        low, high = np.where(below, mid, low), np.where(below, high, mid)
    high[0], high[-1] = 0.0, 1.0
    return high
