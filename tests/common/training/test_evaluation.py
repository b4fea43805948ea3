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
