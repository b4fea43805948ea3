"""Pooled metrics from summed site aggregates equal metrics computed on the pooled scores."""

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from common.training.evaluation import pool_histograms, pooled_staging_metrics, site_evaluation


def _site(rng, n):
    labels = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def test_pooled_from_site_sums_matches_pooled_scores():
    rng = np.random.default_rng(0)
    sites = [_site(rng, n) for n in (40, 25, 60)]
    records = [site_evaluation(p, y, bins=1000) for p, y in sites]
    pooled = pooled_staging_metrics(
        sum(np.asarray(r["score-histogram"]) for r in records),
        sum(np.asarray(r["confusion"]) for r in records),
    )
    probs = np.concatenate([p for p, _ in sites])
    labels = np.concatenate([y for _, y in sites])
    exact = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert abs(pooled["macro-auroc"] - exact) < 2e-3
    assert pooled["n-hips"] == 125
    assert abs(pooled["accuracy"] - (probs.argmax(1) == labels).mean()) < 1e-12
    kappa = cohen_kappa_score(labels, probs.argmax(1), weights="quadratic")
    assert abs(pooled["qw-kappa"] - kappa) < 1e-9


def test_site_record_holds_only_aggregates():
    probs, labels = _site(np.random.default_rng(1), 7)
    record = site_evaluation(probs, labels, bins=50)
    assert set(record) == {"num-examples", "score-histogram", "confusion", "macro-auroc", "accuracy"}
    assert len(record["score-histogram"]) == 4 * 2 * 50 and sum(record["score-histogram"]) == 7 * 4
    assert sum(record["confusion"]) == 7


def test_histogram_intervals_hold_the_estimate_and_narrow_with_more_hips():
    """The server's interval, from pooled histograms only: it holds the pooled AUROC, matches a
    stratified bootstrap of the hip scores themselves, and narrows as the test set grows."""
    from common.training.evaluation import histogram_intervals
    from common.training.metrics import score_histograms

    rng = np.random.default_rng(3)

    def draw(n):
        labels = rng.integers(0, 4, n)
        logits = rng.normal(0, 1, (n, 4)) + 1.2 * np.eye(4)[labels]
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True), labels

    probs, labels = draw(120)
    hist = score_histograms(probs, labels, bins=1000)
    pooled = pooled_staging_metrics(hist, np.zeros(16))
    ci = histogram_intervals(hist, reps=2000)
    assert ci["macro-auroc"][0] < pooled["macro-auroc"] < ci["macro-auroc"][1]
    for stage in (1, 2, 3, 4):
        low, high = ci[f"auroc-stage-{stage}"]
        assert low < pooled[f"auroc-stage-{stage}"] < high
        # the same resampling done on the scores: positives and negatives drawn with replacement
        positive = labels == stage - 1
        pos, neg = probs[positive, stage - 1], probs[~positive, stage - 1]
        direct = [
            roc_auc_score(
                np.r_[np.ones(len(pos)), np.zeros(len(neg))],
                np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))],
            )
            for _ in range(2000)
        ]
        assert abs(low - np.percentile(direct, 2.5)) < 0.03 and abs(high - np.percentile(direct, 97.5)) < 0.03
    wide = ci["macro-auroc"][1] - ci["macro-auroc"][0]
    big_probs, big_labels = draw(1200)
    big = histogram_intervals(score_histograms(big_probs, big_labels, bins=1000), reps=2000)
    assert big["macro-auroc"][1] - big["macro-auroc"][0] < wide / 2


# The server's pooled AUROC from the sites' summed histograms, against the exact AUROC of the same
# hips. A positive and a negative in one bin count one half; every other pair is ordered as the
# scores are, so the gap is at most half the share of pairs tied in a bin (computed below from the
# histograms alone). The bins are equal in t(p), half probability and half log-odds over [-20, 20]
# (common/training/score_bins.py): spread scores rarely share a bin (under 1.8e-3 wide in p at the
# default bins), and neither do confident ones (under 0.08 wide in log-odds): both within TOLERANCE.
DEFAULT_BINS = 1000  # `histogram-bins` of pyproject.toml
TOLERANCE = 0.005
SITE_SIZES = (40, 25, 60, 35)


def _soft(rng, n):
    """Spread scores: Dirichlet, a little weight on the true stage (macro AUROC about 0.9)."""
    labels = rng.integers(0, 4, n)
    return np.stack([rng.dirichlet(1 + 2 * np.eye(4)[y]) for y in labels]), labels


def _confident(rng, n):
    """Scores near 0 and 1: softmax of logits 8 x (noise + 1.5 on the true stage), two thirds right."""
    labels = rng.integers(0, 4, n)
    logits = 8 * (rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[labels])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True), labels


def _pooled_from_sites(draw, seed, bins=DEFAULT_BINS):
    """Four sites' records summed as the server sums them (in the clear, and as the secure sum of the
    flat vectors), the pooled figures, and the pooled hips themselves."""
    rng = np.random.default_rng(seed)
    sites = [draw(rng, n) for n in SITE_SIZES]
    records = [site_evaluation(p, y, bins=bins) for p, y in sites]
    clear = pool_histograms([r["score-histogram"] for r in records])
    secure = sum(np.asarray(r["score-histogram"]) for r in records)
    assert np.array_equal(clear.ravel(), secure)
    confusion = sum(np.asarray(r["confusion"]) for r in records)
    probs, labels = (np.concatenate(x) for x in zip(*sites, strict=True))
    return pooled_staging_metrics(clear, confusion), clear, probs, labels


def _half_tied_share(hist):
    """Per stage: half the share of positive-negative pairs that fall in one bin (the gap's bound)."""
    negatives, positives = hist[:, 0], hist[:, 1]
    return 0.5 * (negatives * positives).sum(1) / (negatives.sum(1) * positives.sum(1))


@pytest.mark.parametrize("seed", range(5))
def test_pooled_auroc_of_spread_scores_is_within_tolerance_of_the_exact_one(seed):
    pooled, _, probs, labels = _pooled_from_sites(_soft, seed)
    exact = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert abs(pooled["macro-auroc"] - exact) < TOLERANCE  # measured, 20 seeds: 2.0e-4 (7.4e-4 per stage)
    for k in range(4):
        assert abs(pooled[f"auroc-stage-{k + 1}"] - roc_auc_score(labels == k, probs[:, k])) < TOLERANCE


@pytest.mark.parametrize("draw", [_soft, _confident], ids=["spread", "confident"])
@pytest.mark.parametrize("bins", [DEFAULT_BINS, 20])
def test_the_pooled_auroc_gap_is_bounded_by_the_pairs_tied_in_a_bin(draw, bins):
    """What the server can say of its own figure without seeing a score: how far it can be from the
    exact AUROC, half the tied pairs' share (20 bins: what a site releases in the clear)."""
    for seed in range(5):
        pooled, hist, probs, labels = _pooled_from_sites(draw, seed, bins)
        bound = _half_tied_share(hist.reshape(4, 2, -1))
        for k in range(4):
            exact = roc_auc_score(labels == k, probs[:, k])
            assert abs(pooled[f"auroc-stage-{k + 1}"] - exact) <= bound[k] + 1e-12
        exact = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
        assert abs(pooled["macro-auroc"] - exact) <= bound.mean() + 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_pooled_auroc_of_confident_scores_is_within_tolerance_of_the_exact_one(seed):
    """Scores crowd below 0.001 and above 0.999; with equal bins in p they shared the first and last
    of 1000 bins, and the gap was up to 0.036 macro, 0.064 per stage (20 seeds)."""
    pooled, _, probs, labels = _pooled_from_sites(_confident, seed)
    exact = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert abs(pooled["macro-auroc"] - exact) < TOLERANCE  # measured, 20 seeds: 8.6e-4 (3.5e-3 per stage)
    for k in range(4):
        assert abs(pooled[f"auroc-stage-{k + 1}"] - roc_auc_score(labels == k, probs[:, k])) < TOLERANCE


def test_confusion_and_per_stage_rates_from_site_sums_equal_those_of_the_pooled_hips():
    """Sensitivity, specificity, balanced accuracy and the confusion matrix the server computes from
    the summed counts are those of the pooled hips, as the main job's table (``Scored.summary``) and
    scikit-learn compute them from the hips themselves."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score

    from simulation.generalisation import Scored

    for draw, seed in ((_soft, 0), (_confident, 1)):
        pooled, _, probs, labels = _pooled_from_sites(draw, seed)
        predicted = probs.argmax(1)
        table = Scored(probs, labels, np.arange(len(labels)).astype(str)).summary(reps=5)
        assert pooled["confusion"] == confusion_matrix(labels, predicted).ravel().tolist()
        assert pooled["confusion"] == np.ravel(table["confusion"]).tolist()
        sensitivity = recall_score(labels, predicted, average=None)
        specificity = [recall_score(labels != k, predicted != k) for k in range(4)]
        for k in range(4):
            assert pooled[f"sensitivity-stage-{k + 1}"] == pytest.approx(sensitivity[k], abs=1e-12)
            assert pooled[f"specificity-stage-{k + 1}"] == pytest.approx(specificity[k], abs=1e-12)
            assert pooled[f"sensitivity-stage-{k + 1}"] == pytest.approx(table["sensitivity"][k], abs=1e-12)
            assert pooled[f"specificity-stage-{k + 1}"] == pytest.approx(table["specificity"][k], abs=1e-12)
        assert pooled["balanced-accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
        assert pooled["balanced-accuracy"] == pytest.approx(table["balanced-accuracy"])
        assert pooled["accuracy"] == pytest.approx(table["accuracy"])


def test_a_stage_absent_from_the_test_hips_has_no_sensitivity():
    confusion = np.array([[5, 1, 0, 0], [2, 3, 0, 0], [0, 0, 0, 0], [0, 1, 0, 4]])
    pooled = pooled_staging_metrics(np.zeros(4 * 2 * 10), confusion)
    assert pooled["sensitivity-stage-3"] == -1.0  # no stage III hip: undefined, marked as the AUROC is
    assert pooled["specificity-stage-3"] == 1.0  # no hip called stage III
    assert pooled["sensitivity-stage-1"] == pytest.approx(5 / 6)
    assert pooled["specificity-stage-1"] == pytest.approx(1 - 2 / 10)


def test_the_predicted_stage_ece_is_not_determined_by_what_sites_send():
    """Why the server reports no calibration error: two stage I hips, and the same two with their
    stage II and III scores swapped. Every site record (score histograms at any bins, confusion
    counts) is identical, yet one hip's confidence moves to another ECE bin: ECE 0.075 vs 0.47."""
    from common.evaluate import expected_calibration_error

    labels = np.array([0, 0])
    before = np.array([[0.28, 0.42, 0.15, 0.15], [0.43, 0.37, 0.20, 0.00]])  # called II at .42, I at .43
    after = np.array([[0.28, 0.37, 0.20, 0.15], [0.43, 0.42, 0.15, 0.00]])  # called II at .37, I at .43
    for bins in (20, DEFAULT_BINS):
        assert site_evaluation(before, labels, bins) == site_evaluation(after, labels, bins)

    def ece(probs):
        return expected_calibration_error(probs.max(1), probs.argmax(1) == labels)

    assert ece(before) == pytest.approx(0.075) and ece(after) == pytest.approx(0.47)
