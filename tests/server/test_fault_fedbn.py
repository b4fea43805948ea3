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


def test_the_first_staging_round_starts_from_the_sites_own_pretraining_layers(tmp_path):
    """Issue 15 item 6: at the transfer, a site's staging encoder takes its own phase-1
    normalisation layers (the server transfers the shared encoder weights), not fresh ones."""
    from common.models.factory import build_staging, build_translation
    from common.training.weights import get_local_state, local_norm_keys

    site, cfg = setup(tmp_path)
    translation = get_local_state(build_translation(cfg.model))
    mine = {k: (np.full_like(v, 7) if v.dtype.kind == "f" else v) for k, v in translation.items()}
    tasks.save_local_layers(site, cfg, "pretrain", 2, mine)
    seeded = tasks.stage_layers_from_pretraining(site, cfg)
    staging = build_staging(cfg.model)
    fresh = get_local_state(staging)
    assert set(seeded) == set(fresh) == local_norm_keys(staging)
    encoder = [k for k in seeded if k.startswith("encoder.") and seeded[k].dtype.kind == "f"]
    assert encoder and all((seeded[k] == 7).all() for k in encoder)
    for key in set(seeded) - set(encoder):  # outside the encoder: as a fresh staging net starts
        np.testing.assert_array_equal(seeded[key], fresh[key], err_msg=key)
    assert tasks.stage_layers_from_pretraining(*setup(tmp_path, "no-pretraining")) is None
