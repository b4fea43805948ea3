"""Issue 14 item 5, faults in every phase: FedBN's site layers are kept in the site's own cache dir,
per run name and phase, so a resumed run (or a restarted site) trains on with them.

The end-to-end kill-and-resume of a FedBN run is ``tests/server/test_resume.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client import tasks
from common.config import RunConfig, SiteConfig


def layers(value: float) -> dict[str, np.ndarray]:
    return {"bn.weight": np.full(3, value, np.float32), "bn.running_var": np.full(3, value + 1, np.float32)}


def setup(tmp_path: Path, run_name: str = "run-a") -> tuple[SiteConfig, RunConfig]:
    cfg = RunConfig.from_dict({"fedbn": True, "run-name": run_name})
    return SiteConfig("site-00", tmp_path / "data", tmp_path / "cache"), cfg


def test_item5_fedbn_layers_round_trip_and_a_repeated_round_starts_from_the_one_before(tmp_path):
    site, cfg = setup(tmp_path)
    assert tasks.load_local_layers(site, cfg, "stage") is None
    for round_no in (1, 2, 3):
        tasks.save_local_layers(site, cfg, "stage", round_no, layers(round_no))
    folder = tasks.local_layers_dir(site, cfg, "stage")
    assert folder.is_relative_to(site.cache_dir)
    # Every round is kept: the final test may pair an earlier, best-validated round with its layers.
    assert sorted(p.name for p in folder.glob("*.npz")) == [
        "round-0001.npz",
        "round-0002.npz",
        "round-0003.npz",
    ]
    np.testing.assert_array_equal(tasks.load_local_layers(site, cfg, "stage", before=2)["bn.weight"], 1)
    np.testing.assert_array_equal(tasks.load_local_layers(site, cfg, "stage")["bn.weight"], 3)
    # Round 3 repeated after a resume (the server's checkpoint holds round 2) starts from round 2's layers.
    np.testing.assert_array_equal(tasks.load_local_layers(site, cfg, "stage", before=3)["bn.weight"], 2)
    assert tasks.load_local_layers(site, cfg, "stage", before=1) is None
    # Phases and runs are kept apart.
    assert tasks.load_local_layers(site, cfg, "pretrain") is None
    assert tasks.load_local_layers(*setup(tmp_path, "run-b"), "stage") is None


def test_item5_fedbn_layers_of_an_earlier_run_of_the_same_name_are_not_used(tmp_path):
    site, cfg = setup(tmp_path)
    for round_no in (1, 2, 3):
        tasks.save_local_layers(site, cfg, "stage", round_no, layers(round_no))
    # A new run under the same name starts at round 1: nothing before it, and later files go.
    assert tasks.load_local_layers(site, cfg, "stage", before=1) is None
    tasks.save_local_layers(site, cfg, "stage", 1, layers(10))
    np.testing.assert_array_equal(tasks.load_local_layers(site, cfg, "stage")["bn.weight"], 10)
    assert [p.name for p in tasks.local_layers_dir(site, cfg, "stage").glob("*.npz")] == ["round-0001.npz"]


def test_item5_fedbn_layers_stay_under_the_site_cache_whatever_the_run_name(tmp_path):
    for name in ("../../etc", "/abs/path", "..", "a/b"):
        site, cfg = setup(tmp_path, name)
        folder = tasks.local_layers_dir(site, cfg, "stage")
        assert folder.resolve().is_relative_to((site.cache_dir / "fedbn").resolve()), name
        assert folder.parent.parent == site.cache_dir / "fedbn", name
