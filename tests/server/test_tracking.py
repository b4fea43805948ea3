"""Experiment tracking: every number of a round lands in TensorBoard under its path; bad names are refused."""

from __future__ import annotations

import pytest

from server.tracking import numeric_leaves, open_tracker


def test_numeric_leaves_walk_dicts_and_skip_lists_flags_and_nan():
    entry = {
        "evaluate": {"macro-auroc": 0.9, "confusion": [1, 2], "sites": {"site-00": {"n": 3}}},
        "ok": True,
        "loss": float("nan"),
        "bytes": 12,
    }
    assert dict(numeric_leaves(entry)) == {
        "evaluate/macro-auroc": 0.9,
        "evaluate/sites/site-00/n": 3.0,
        "bytes": 12.0,
    }


def test_unknown_tracker_is_named(tmp_path):
    with pytest.raises(ValueError, match="'tracking' = 'mlflow' is invalid"):
        open_tracker("mlflow", tmp_path)
    assert open_tracker("none", tmp_path) is None
