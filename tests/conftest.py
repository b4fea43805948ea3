"""Shared fixtures: a tiny synthetic federation written as real DICOM, once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> Path:
    """Two synthetic hospitals, six patients each, tiny images (DICOM + labels.csv + truth)."""
    from simulation.synth.federation import generate_federation

    out = tmp_path_factory.mktemp("federation")
    return generate_federation(out, sites=2, patients=6, seed=0, size="tiny")
