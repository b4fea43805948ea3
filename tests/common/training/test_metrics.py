"""Tests of the staging and translation metrics against scikit-learn and known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from common.training.metrics import (
    adjacent_stage_aurocs,
    auroc_from_histograms,
    bootstrap_macro_auroc_ci,
    one_vs_rest_aurocs,
    score_histograms,
    staging_metrics,
    translation_metrics,
)


def _scores(n=200, seed=0, signal=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), labels] += signal
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


def test_staging_metrics_match_sklearn():
    probs, labels = _scores()
    metrics = staging_metrics(probs, labels, n_boot=200)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert metrics["macro_auroc"] == pytest.approx(expected, abs=1e-12)
    for c in range(4):
        assert metrics["per_stage_auroc"][str(c + 1)] == pytest.approx(
            roc_auc_score(labels == c, probs[:, c])
        )
    predictions = probs.argmax(axis=1)
    assert metrics["accuracy"] == pytest.approx(np.mean(predictions == labels))
    assert metrics["qwk"] == pytest.approx(cohen_kappa_score(labels, predictions, weights="quadratic"))
    assert np.array(metrics["confusion_matrix"]).sum() == len(labels)
    assert np.trace(np.array(metrics["confusion_matrix"])) == int(np.sum(predictions == labels))
    low, high = metrics["macro_auroc_ci"]
    assert low < metrics["macro_auroc"] < high
    assert metrics["auroc_stages"] == [1, 2, 3, 4] and metrics["n_samples"] == 200


@pytest.mark.parametrize("decimals", [None, 2, 1])  # continuous scores, then more and more ties
def test_rank_aurocs_equal_sklearn_with_and_without_ties(decimals):
    for seed in range(5):
        probs, labels = _scores(n=150, seed=seed)
        if decimals is not None:
            probs = np.round(probs, decimals)
        expected = [roc_auc_score(labels == c, probs[:, c]) for c in range(4)]
        assert np.allclose(one_vs_rest_aurocs(probs, labels), expected, rtol=0, atol=1e-12)
    absent = one_vs_rest_aurocs(probs, np.where(labels == 3, 0, labels))  # no stage IV
    assert np.isnan(absent[3]) and np.isfinite(absent[:3]).all()


def test_adjacent_stage_aurocs_order_each_neighbouring_pair_and_show_a_backwards_one():
    probs, labels = _scores(n=300, seed=3, signal=0.8)
    got = adjacent_stage_aurocs(probs, labels)
    for a, key in enumerate(("I-II", "II-III", "III-IV")):
        pair = (labels == a) | (labels == a + 1)
        margin = np.log(probs[pair, a + 1]) - np.log(probs[pair, a])
        assert got[key] == pytest.approx(roc_auc_score(labels[pair] == a + 1, margin), abs=1e-12)
        assert got[key] > 0.6  # the scores carry each stage's signal
    swapped = probs.copy()
    swapped[:, [0, 1]] = probs[:, [1, 0]]  # a model that mistakes stage I for II and back
    backwards = adjacent_stage_aurocs(swapped, labels)
    assert backwards["I-II"] == pytest.approx(1.0 - got["I-II"], abs=1e-12) and backwards["I-II"] < 0.4
    assert np.isnan(adjacent_stage_aurocs(probs, np.where(labels == 1, 0, labels))["I-II"])  # no stage II


def test_absent_stage_is_left_out_of_the_macro_mean():
    probs, labels = _scores()
    keep = labels != 3
    metrics = staging_metrics(probs[keep], labels[keep], n_boot=50)
    assert metrics["per_stage_auroc"]["4"] is None
    assert metrics["auroc_stages"] == [1, 2, 3]
    expected = np.mean([roc_auc_score(labels[keep] == c, probs[keep, c]) for c in range(3)])
    assert metrics["macro_auroc"] == pytest.approx(expected)
    assert len(metrics["confusion_matrix"]) == 4


def test_single_class_gives_nan_auroc_not_an_error():
    probs, _ = _scores(n=10)
    metrics = staging_metrics(probs, np.zeros(10, dtype=int), n_boot=20)
    assert np.isnan(metrics["macro_auroc"]) and all(np.isnan(metrics["macro_auroc_ci"]))


def test_bootstrap_ci_is_reproducible_and_narrows_with_more_data():
    small = bootstrap_macro_auroc_ci(*_scores(n=60), n_boot=300, seed=1)
    assert small == bootstrap_macro_auroc_ci(*_scores(n=60), n_boot=300, seed=1)
    large = bootstrap_macro_auroc_ci(*_scores(n=2000), n_boot=300, seed=1)
    assert (large[1] - large[0]) < (small[1] - small[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auroc_matches_sklearn(seed):
    probs, labels = _scores(n=500, seed=seed, signal=1.0)
    hist = score_histograms(probs, labels, bins=1000)
    assert hist.shape == (4, 2, 1000) and hist.sum() == 4 * 500
    result = auroc_from_histograms(hist)
    for c in range(4):
        assert result["per_class_auroc"][c] == pytest.approx(
            roc_auc_score(labels == c, probs[:, c]), abs=1e-3
        )
    expected_macro = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert result["macro_auroc"] == pytest.approx(expected_macro, abs=1e-3)


def test_site_histograms_add_up_to_the_pooled_auroc():
    probs, labels = _scores(n=400, seed=4)
    pooled = score_histograms(probs, labels)
    summed = score_histograms(probs[:150], labels[:150]) + score_histograms(probs[150:], labels[150:])
    assert np.array_equal(pooled, summed)


def test_histogram_ties_count_half():
    # positives and negatives all in one bin: chance level exactly
    probs = np.full((4, 4), 0.25)
    hist = score_histograms(probs, np.array([0, 1, 2, 3]), bins=10)
    assert auroc_from_histograms(hist)["macro_auroc"] == pytest.approx(0.5)


def test_histogram_with_absent_class():
    probs, labels = _scores(n=100)
    keep = labels != 2
    result = auroc_from_histograms(score_histograms(probs[keep], labels[keep]))
    assert result["per_class_auroc"][2] is None and result["classes"] == [0, 1, 3]


def test_translation_metrics_known_values():
    target = torch.rand(3, 1, 32, 32) * 2 - 1
    perfect = translation_metrics(target, target, (-200.0, 1400.0))
    assert perfect["mae_hu"] == pytest.approx(0.0, abs=1e-4)
    assert perfect["ssim"] == pytest.approx(1.0, abs=1e-4)
    offset = (target + 0.1).clamp(-1, 1)
    values = translation_metrics(offset, target, (-200.0, 1400.0))
    # 1600 HU window over 2 normalised units: mean |error| in HU = 800 * mean |error|
    assert values["mae_hu"] == pytest.approx(800 * float((offset - target).abs().mean()), rel=1e-5)
    mse = float(((offset - target) ** 2).mean(dim=(1, 2, 3)).log10().mean())
    assert values["psnr"] == pytest.approx(10 * np.log10(4.0) - 10 * mse, rel=1e-4)
    assert values["ssim"] < 1.0
