"""The decision rules of ``benchmarks/bench_decision.py``, and the rule that chooses among them."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_decision import RULES, choose, cross_fitted, decide, figures, prior_bias


def test_each_rule_decides_as_its_name_says():
    probs = np.array([[0.45, 0.40, 0.10, 0.05], [0.10, 0.15, 0.35, 0.40], [0.30, 0.0, 0.0, 0.70]])
    assert decide("argmax", probs).tolist() == [0, 3, 3]
    assert decide("median", probs).tolist() == [1, 2, 3]  # first stage where the cumulative reaches 1/2
    assert decide("expected", probs).tolist() == [1, 2, 2]  # 0.75, 2.05 and 2.1, rounded
    shift = np.log([1.0, 2.0, 1.0, 1.0])  # stage II's logit up by log 2
    assert decide("prior-corrected", probs, shift).tolist() == [1, 3, 3]
    with pytest.raises(ValueError, match="unknown decision rule"):
        decide("mode", probs)


def test_the_prior_correction_moves_mean_predictions_towards_the_label_shares():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    probs = rng.dirichlet([4.0, 1.0, 1.0, 1.0], 400)  # stage I over-predicted
    bias = prior_bias(probs, labels)
    corrected = probs * np.exp(bias)
    corrected /= corrected.sum(1, keepdims=True)
    shares = np.bincount(labels, minlength=4) / 400
    assert np.abs(corrected.mean(0) - shares).sum() < 0.5 * np.abs(probs.mean(0) - shares).sum()
    assert bias[0] < 0 < bias[1]


def test_cross_fitting_predicts_every_hip_under_every_rule():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4), 200)
    patients = np.array([f"site-00/p{i // 2}" for i in range(200)])  # two hips a patient
    predicted = cross_fitted(probs, labels, patients)
    assert set(predicted) == set(RULES)
    assert all(p.shape == (200,) and p.min() >= 0 and p.max() <= 3 for p in predicted.values())
    assert (predicted["argmax"] == probs.argmax(1)).all()


def test_argmax_stays_unless_a_rule_passes_and_gains_enough():
    labels = np.repeat(np.arange(4), 10)
    base = figures(labels.copy(), labels)
    base["balanced-accuracy"], base["qw-kappa"] = 0.50, 0.70
    better = dict(base, **{"balanced-accuracy": 0.53, "sensitivity": [0.5, 0.3, 0.5, 0.9]})
    no_stage_two = dict(better, **{"balanced-accuracy": 0.60, "sensitivity": [0.9, 0.1, 0.5, 0.9]})
    small_gain = dict(better, **{"balanced-accuracy": 0.515})
    worse_kappa = dict(better, **{"qw-kappa": 0.67})
    assert choose({"argmax": base, "median": better}) == "median"
    assert choose({"argmax": base, "median": small_gain}) == "argmax"
    assert choose({"argmax": base, "median": no_stage_two}) == "argmax"
    assert choose({"argmax": base, "median": worse_kappa}) == "argmax"
    assert choose({"argmax": base, "median": better, "expected": no_stage_two}) == "median"
