"""Leave-one-site-out on 3 sites of a tiny federation, in Flower's simulation runtime: each fold's
federation never starts the site it leaves out, and that site's test hips are what it is scored on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulation.generalisation import Scored, delivered_model, leave_one_site_out, site_data
from tests.server.test_federation import tiny_config


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory):
    from simulation.synth.federation import generate_federation

    out = tmp_path_factory.mktemp("federation3")
    generate_federation(out, sites=3, patients=6, seed=0, size="tiny")
    return out, sorted(d for d in out.iterdir() if d.is_dir() and d.name.startswith("site-"))


@pytest.fixture(scope="module")
def folds(three_sites, tmp_path_factory):
    root, sites = three_sites
    out = tmp_path_factory.mktemp("loso")
    cfg = tiny_config(root, out)
    return cfg, sites, leave_one_site_out(cfg, sites, out, progress=lambda _m: None)


def test_each_fold_trains_without_the_site_it_leaves_out(folds):
    cfg, sites, result = folds
    assert set(result) == {d.name for d in sites}
    for held_out, fold in result.items():
        results = json.loads((fold["federated"] / "results.json").read_text())
        others = {d.name for d in sites} - {held_out}
        assert set(results["history"]["inventory"]) == others  # the server met the other two only
        run_name = fold["federated"].name
        assert not delivered_model(cfg, held_out, run_name).exists()  # never a SuperNode of this run
        for site in others:
            assert (delivered_model(cfg, site, run_name) / "final_model.npz").is_file()
        info = json.loads((fold["centralized"] / "results.json").read_text())
        assert sorted(info["sites"]) == sorted(others)


def test_the_left_out_site_is_scored_on_its_own_test_hips(folds):
    cfg, sites, result = folds
    for site in sites:
        data = site_data(cfg, site)
        expected = data.staging_patients("test")
        scores = result[site.name]["scores"]
        assert set(scores) == {"federated", "federated+adabn", "centralized", "centralized+adabn"}
        for scored in scores.values():
            assert len(scored.labels) == len(expected) > 0
            assert list(scored.patients) == [f"{site.name}/{p}" for p in expected]
            assert np.array_equal(scored.labels + 1, data.staging_set("test")[2])
        # adapting the batch statistics to the site changed the scores of the same model
        assert not np.allclose(scores["federated"].probs, scores["federated+adabn"].probs)


def test_pooled_folds_give_intervals_and_paired_differences(folds):
    _, _, result = folds
    plain = Scored.join(f["scores"]["federated"] for f in result.values())
    adapted = Scored.join(f["scores"]["federated+adabn"] for f in result.values())
    summary = plain.summary(reps=200)
    assert summary["hips"] == len(plain.labels) and summary["patients"] <= summary["hips"]
    paired = adapted.versus(plain, reps=200)
    assert paired["difference"] == pytest.approx(
        adapted.summary(reps=10)["macro-auroc"] - summary["macro-auroc"], nan_ok=True
    )
    assert 0.0 <= paired["p"] <= 1.0 or np.isnan(paired["p"])
    with pytest.raises(ValueError, match="same hips"):
        plain.versus(Scored.join(list(result.values())[0]["scores"]["federated"] for _ in [0]))
