"""The score grid sites bin their scores on (common/training/score_bins.py): one definition, whose
probability edges are the ones ``score_histograms`` counts with."""

import numpy as np
import pytest

from common.training.metrics import score_histograms
from common.training.score_bins import LOGIT_LIMIT, bin_coordinate, bin_edges


def _bins_of(scores, bins):
    """Which bin ``score_histograms`` puts each score into (one hip at a time, class 0 negatives)."""
    out = []
    for s in scores:
        hist = score_histograms(np.array([[s, 1 - s, 0.0, 0.0]]), np.array([1]), bins=bins)
        out.append(int(np.flatnonzero(hist[0, 0])[0]))
    return np.array(out)


def test_the_coordinate_maps_zero_to_one_onto_itself_in_order_and_symmetrically():
    p = np.unique(
        np.r_[0.0, np.logspace(-30, -1, 200), np.linspace(0.1, 0.9, 201), 1 - np.logspace(-1, -15, 200), 1.0]
    )
    t = bin_coordinate(p)
    assert t[0] == 0.0 and t[-1] == 1.0
    assert np.all(np.diff(t) >= 0)  # bins keep the scores' order
    inside = np.abs(np.log(p[1:-1]) - np.log1p(-p[1:-1])) < LOGIT_LIMIT
    assert np.all(np.diff(t[1:-1][inside]) > 0)  # and tell them apart, inside the log-odds range
    assert np.allclose(bin_coordinate(1 - p[1:-1]), 1 - t[1:-1], atol=1e-12)
    assert bin_coordinate(1.0 + 1e-7) == 1.0 and bin_coordinate(-1e-9) == 0.0  # rounding past [0, 1]
    assert np.isnan(bin_coordinate(np.nan))


@pytest.mark.parametrize("bins", [5, 20, 1000])
def test_the_probability_edges_are_those_the_histograms_count_with(bins):
    edges = bin_edges(bins)
    assert edges.shape == (bins + 1,) and edges[0] == 0.0 and edges[-1] == 1.0
    assert np.all(np.diff(edges) > 0)
    assert np.allclose(edges, 1 - edges[::-1], rtol=0, atol=1e-12)  # symmetric about 1/2
    inner = edges[1:-1]
    assert np.array_equal(_bins_of(inner, bins), np.arange(1, bins))  # an edge opens its bin
    assert np.array_equal(
        _bins_of(np.nextafter(inner, 0), bins), np.arange(0, bins - 1)
    )  # just below: the one before
    middle = 0.5 * (edges[:-1] + edges[1:])
    assert np.array_equal(_bins_of(middle, bins), np.arange(bins))


def test_the_grid_resolves_confident_scores_and_keeps_spread_ones_apart():
    edges = bin_edges(1000)
    log_odds = np.log(edges[1:-1]) - np.log1p(-edges[1:-1])
    inside = np.abs(log_odds) < LOGIT_LIMIT
    assert (
        np.diff(log_odds[inside]).max() <= 4 * LOGIT_LIMIT / 1000 + 1e-6
    )  # 0.08 in log-odds (float64 near 1)
    assert np.diff(edges).max() < 1.9 / 1000  # at most about 1.8/bins in probability (at p = 1/2)
    assert edges[1] == pytest.approx(2.2e-9, rel=0.05) and 1 - edges[-2] == pytest.approx(2.2e-9, rel=0.05)
    # 1e-4 and 1e-3 (and 1 - 1e-3, 1 - 1e-4) shared the first (last) of 1000 equal bins in p
    assert len(set(_bins_of([1e-6, 1e-5, 1e-4, 1e-3, 1 - 1e-3, 1 - 1e-4, 1 - 1e-5], 1000))) == 7


def test_the_message_is_unchanged_by_the_grid():
    """Same array, same length, counts that add up: only which bin a score falls in is the grid's."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 50)
    logits = 8 * (rng.normal(size=(50, 4)) + 1.5 * np.eye(4)[labels])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for bins in (20, 1000):
        hist = score_histograms(probs, labels, bins=bins)
        assert hist.shape == (4, 2, bins) and hist.dtype == np.int64
        assert np.array_equal(hist.sum(axis=(0, 2)), [3 * 50, 50])
        halves = score_histograms(probs[:20], labels[:20], bins) + score_histograms(
            probs[20:], labels[20:], bins
        )
        assert np.array_equal(hist, halves)
