"""Pooled metrics from summed site aggregates equal metrics computed on the pooled scores."""

import numpy as np
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from common.training.evaluation import pooled_staging_metrics, site_evaluation


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
