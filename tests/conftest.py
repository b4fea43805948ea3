"""Shared fixtures (a tiny synthetic federation written as real DICOM, once per test session) and the order
in which pytest-xdist hands out test files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the cores: one thread each, or their thread pools fight over them.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The longest files, longest first (from `--durations` of CI runs). The deployment ones mostly wait on
# Flower's 3 s polls, so starting them at once on separate workers overlaps their waiting with the rest.
LONGEST_FIRST = (
    "tests/deployment/test_late_site.py",
    "tests/deployment/test_rejoin.py",
    "tests/simulation/test_difficulty.py",
    "tests/deployment/test_end_to_end.py",
    "tests/server/test_resume.py",
    "tests/deployment/test_front.py",
    "tests/simulation/test_generalisation.py",
    "tests/simulation/test_main_job.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """Under xdist, the files of LONGEST_FIRST first, in that order, then the other slow ones, then the
    rest. A serial run keeps pytest's own order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def rank(item) -> tuple[int, int]:
        path = item.nodeid.split("::")[0]
        if path in LONGEST_FIRST:
            return (0, LONGEST_FIRST.index(path))
        return (1 if item.get_closest_marker("slow") else 2, 0)

    items.sort(key=rank)  # stable: tests keep their order within a file


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> Path:
    """Two synthetic hospitals, six patients each, tiny images (DICOM + labels.csv + truth)."""
    from simulation.synth.federation import generate_federation

    out = tmp_path_factory.mktemp("federation")
    return generate_federation(out, sites=2, patients=6, seed=0, size="tiny")
