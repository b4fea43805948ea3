"""The main job's reliability diagram: each column's accuracy against its confidence in the predicted
stage, per bin, from the pooled test hips (``Scored.summary``), written beside the comparison."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from common.config import RunConfig
from common.evaluate import expected_calibration_error, reliability_bins
from simulation.comparison import plot_reliability, reliability_points, report
from simulation.generalisation import Scored

# (confidence in the predicted stage, whether it is the true one) of each hip, per column
COLUMNS = {
    "federated": [(0.95, True)] * 3
    + [(0.95, False), (0.65, True), (0.62, False), (0.45, False), (0.41, False)],
    "centralized": [(0.97, True)] * 4 + [(0.85, True), (0.83, True), (0.88, False), (0.55, True)],
    "local-only": [(0.35, False), (0.32, True), (0.75, True), (0.72, False), (0.78, False), (0.99, True)],
}
# The same by hand: per non-empty bin (tenths), the mean confidence and the share right.
EXPECTED = {
    "federated": ([0.43, 0.635, 0.95], [0.0, 0.5, 0.75]),
    "centralized": ([0.55, (0.85 + 0.83 + 0.88) / 3, 0.97], [1.0, 2 / 3, 1.0]),
    "local-only": ([0.335, 0.75, 0.99], [0.5, 1 / 3, 1.0]),
}
# federated ECE by hand: (4 x |0.95 - 0.75| + 2 x |0.635 - 0.5| + 2 x |0.43 - 0|) / 8
FEDERATED_ECE = (4 * 0.2 + 2 * 0.135 + 2 * 0.43) / 8


def _scored(hips: list[tuple[float, bool]]) -> Scored:
    """Hips whose top probability is the given confidence, on stage ``i % 4``; a wrong call's true
    stage is the next one. Two hips a patient."""
    n = len(hips)
    called = np.arange(n) % 4
    probs = np.empty((n, 4))
    for i, (confidence, _) in enumerate(hips):
        probs[i] = (1 - confidence) / 3
        probs[i, called[i]] = confidence
    labels = np.where([right for _, right in hips], called, (called + 1) % 4)
    return Scored(probs, labels, np.asarray([f"p{i // 2}" for i in range(n)]))


def test_reliability_bins_count_by_hand():
    confidence = np.array([0.05, 0.31, 0.39, 0.92, 1.0, 0.95])
    correct = np.array([False, True, False, True, True, False])
    bins = reliability_bins(confidence, correct)
    assert bins["hips"] == [1, 0, 0, 2, 0, 0, 0, 0, 0, 3]  # 1.0 falls in the last bin
    assert bins["confidence"][3] == pytest.approx(0.35) and bins["accuracy"][3] == 0.5
    assert bins["confidence"][9] == pytest.approx(2.87 / 3) and bins["accuracy"][9] == pytest.approx(2 / 3)
    assert np.isnan(bins["accuracy"][1])  # empty: no point to plot
    ece = (0.05 + 2 * 0.15 + 3 * abs(2.87 / 3 - 2 / 3)) / 6
    assert expected_calibration_error(confidence, correct) == pytest.approx(ece)


def test_the_plotted_points_are_the_hand_computed_ones(tmp_path):
    summaries = {name: _scored(hips).summary(reps=10) for name, hips in COLUMNS.items()}
    plotted = plot_reliability(summaries, tmp_path / "reliability.png")
    assert set(plotted) == set(COLUMNS)
    for name, (confidence, accuracy) in EXPECTED.items():
        assert plotted[name][0] == pytest.approx(confidence), name
        assert plotted[name][1] == pytest.approx(accuracy), name
        assert reliability_points(summaries[name]) == plotted[name]
    assert summaries["federated"]["ece"] == pytest.approx(FEDERATED_ECE)
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_main_jobs_report_writes_and_names_the_diagram(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path), run_name="job")
    cfg.run_dir.mkdir(parents=True)
    intervals = {name: _scored(hips).summary(reps=10) for name, hips in COLUMNS.items()}
    federated = {"test": {"n-hips": 8.0, "macro-auroc": 0.9}, "config": {"secure-aggregation": True}}
    central = {"pooled": {"macro_auroc": 0.95}}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        written = report(cfg, federated, central, {}, {"federated": 60.0, "total": 120.0}, intervals)
    png = cfg.run_dir / "reliability.png"
    assert png in written and png.stat().st_size > 1000 and (cfg.run_dir / "comparison.png").is_file()
    assert "reliability.png" in stdout.getvalue()
    summary = json.loads((cfg.run_dir / "comparison.json").read_text(), parse_constant=pytest.fail)
    pooled = summary["pooled-patient-level"]
    for name, (confidence, accuracy) in EXPECTED.items():  # the diagram's data, and each column's ECE
        assert pooled[name]["ece"] == pytest.approx(intervals[name]["ece"]), name
        bins = pooled[name]["reliability"]
        assert [c for c in bins["confidence"] if c is not None] == pytest.approx(confidence), name
        assert [a for a in bins["accuracy"] if a is not None] == pytest.approx(accuracy), name
    assert pooled["federated"]["ece"] == pytest.approx(FEDERATED_ECE)


def test_no_intervals_no_diagram(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path), run_name="job")
    cfg.run_dir.mkdir(parents=True)
    federated = {"test": {"n-hips": 8.0, "macro-auroc": 0.9}, "config": {}}
    with contextlib.redirect_stdout(io.StringIO()):
        written = report(
            cfg, federated, {"pooled": {"macro_auroc": 0.95}}, {}, {"federated": 1.0, "total": 2.0}
        )
    assert not (cfg.run_dir / "reliability.png").exists() and cfg.run_dir / "comparison.png" in written
