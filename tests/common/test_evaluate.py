"""``onfh evaluate``: a site's own validation of a model, with patient-level intervals."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import common.evaluate as evaluate_module
from common.evaluate import (
    apply_recalibration,
    aurocs,
    evaluate,
    fit_recalibration,
    hip_scores,
    main,
    paired_bootstrap,
    patient_bootstrap,
    patient_draws,
)
from tests.common.test_predict import run_dir  # noqa: F401  (the module's trained model)


def test_the_bootstrap_moves_both_hips_of_a_patient_together():
    """Each patient's two hips carry identical scores and labels here, one patient a class: a
    resample that split a patient's hips would give AUROCs a patient-level resample never can."""
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(12)], 2)
    labels = np.repeat(np.arange(12) % 4, 2)
    probs = np.repeat(rng.dirichlet(np.ones(4), 12), 2, axis=0)
    exact = aurocs(probs, labels)
    ci = patient_bootstrap(probs, labels, patients, reps=300)
    assert set(ci) >= {"macro-auroc", "auroc-stage-I"}
    # Every draw holds each chosen patient's hips as pairs, so it equals an AUROC of whole patients.
    rows = {p: np.flatnonzero(patients == p) for p in np.unique(patients)}
    assert all(len(r) == 2 for r in rows.values())
    for key, (low, high) in ci.items():
        assert low <= high and 0 <= low and high <= 1, key
    assert ci["macro-auroc"][0] <= exact["macro-auroc"] + 0.25


def _one_and_two_hip_patients():
    """Ten patients, six with two hips and four with one, their hips listed apart (all left hips,
    then the right ones) so that a resampler keying on neighbouring rows would split them."""
    left = [f"p{i}" for i in range(10)]
    right = [f"p{i}" for i in range(6)]
    return np.asarray(left + right)


def _assert_patients_move_together(patients, picked):
    """In one draw every hip of a drawn patient appears, each the same number of times, and the
    number of patients drawn (with their multiplicity) is the number of patients."""
    times = np.bincount(picked, minlength=len(patients))
    drawn = 0
    for p in np.unique(patients):
        hips = np.flatnonzero(patients == p)
        assert len(set(times[hips])) == 1, f"patient {p}: its hips drawn {times[hips]} times"
        drawn += times[hips[0]]
    assert drawn == len(np.unique(patients))


def test_patient_draws_keep_a_patients_hips_together():
    patients = _one_and_two_hip_patients()
    draws = list(patient_draws(patients, reps=500, seed=3))
    assert len(draws) == 500
    for picked in draws:
        _assert_patients_move_together(patients, picked)
    # Both kinds of patient are drawn more than once and left out somewhere: the check had teeth.
    counts = np.stack([np.bincount(d, minlength=len(patients)) for d in draws])
    assert (counts[:, [0, 9]] >= 2).any(axis=0).all() and (counts[:, [0, 9]] == 0).any(axis=0).all()


def _spy_on_aurocs(monkeypatch, probs):
    """Record the hip indices of every ``aurocs`` call (each hip's score row is unique) and score as before."""
    calls, real = [], evaluate_module.aurocs
    index = {row.tobytes(): i for i, row in enumerate(probs)}

    def spy(p, y):
        calls.append(np.asarray([index[row.tobytes()] for row in p]))
        return real(p, y)

    monkeypatch.setattr(evaluate_module, "aurocs", spy)
    return calls


def test_the_interval_and_the_paired_comparison_resample_patients(monkeypatch):
    """Through the functions behind every interval: ``patient_bootstrap`` (each column's CI) and
    ``paired_bootstrap`` (a model against another) draw exactly ``patient_draws``, and the paired
    comparison scores both models on the same draw."""
    patients = _one_and_two_hip_patients()
    rng = np.random.default_rng(5)
    a, b = rng.dirichlet(np.ones(4), len(patients)), rng.dirichlet(np.ones(4), len(patients))
    labels = np.arange(len(patients)) % 4
    expected = list(patient_draws(patients, reps=50, seed=7))

    calls = _spy_on_aurocs(monkeypatch, np.concatenate([a, b]))
    patient_bootstrap(a, labels, patients, reps=50, seed=7)
    assert len(calls) == 50 and all(np.array_equal(c, e) for c, e in zip(calls, expected, strict=True))

    calls.clear()
    paired_bootstrap(a, b, labels, patients, reps=50, seed=7)
    draws_a, draws_b = calls[0:100:2], [c - len(patients) for c in calls[1:100:2]]  # b's rows follow a's
    for picked_a, picked_b, want in zip(draws_a, draws_b, expected, strict=True):
        assert np.array_equal(picked_a, want) and np.array_equal(picked_b, want)
        _assert_patients_move_together(patients, picked_a)


def test_recalibration_keeps_every_auroc_and_fits_the_validation_hips():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    logits = rng.normal(0, 1, (200, 4)) + 3.0 * np.eye(4)[labels]  # overconfident after the scaling below
    probs = np.exp(3 * logits) / np.exp(3 * logits).sum(axis=1, keepdims=True)
    maps = fit_recalibration(probs[:100], labels[:100])
    assert all(a > 0 for a, _ in maps)
    calibrated = apply_recalibration(probs, maps)
    for k in range(4):  # monotone per stage: the same ranking, the same AUROC, exactly
        exact = roc_auc_score(labels == k, probs[:, k])
        assert roc_auc_score(labels == k, calibrated[:, k]) == pytest.approx(exact, abs=1e-12)
    from common.evaluate import classwise_ece

    assert classwise_ece(apply_recalibration(probs[:100], maps), labels[:100]) < classwise_ece(
        probs[:100], labels[:100]
    )


def test_evaluate_reports_intervals_calibration_and_protocol_groups(run_dir, tiny_federation, tmp_path):  # noqa: F811
    out = tmp_path / "report"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(
            [str(tiny_federation / "site-00"), "--model", str(run_dir), "--split", "all", "--out", str(out)]
        )
    assert rc == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert (out / "reliability.png").stat().st_size > 1000
    scores = hip_scores(tiny_federation / "site-00", run_dir, ("train", "val", "test"), tmp_path / "cache")
    assert report["hips"] == len(scores["labels"]) and report["patients"] == len(set(scores["patients"]))
    assert report["macro-auroc"] == pytest.approx(evaluate(scores)["macro-auroc"])
    assert np.sum(report["confusion"]) == report["hips"]
    assert sum(g["hips"] for g in report["by-protocols"].values()) == report["hips"]
    assert 0 <= report["ece"] <= 1
    assert "95% CI (patients resampled)" in stdout.getvalue()


def test_a_site_without_labels_in_the_split_exits_2(run_dir, tmp_path):  # noqa: F811
    empty = tmp_path / "empty-site"
    empty.mkdir()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main([str(empty), "--model", str(run_dir)]) == 2
    assert "onfh evaluate:" in err.getvalue() and str(empty) in err.getvalue()
