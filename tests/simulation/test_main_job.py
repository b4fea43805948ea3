"""``onfh simulate`` end to end on a tiny federation, baselines included: the comparison table carries
each column's pooled AUROC with an interval that resamples patients, and the federated column's
hip-by-hip figures, scored by the simulation with the models the sites received, agree with the
server's pooled test from the sites' aggregates."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from simulation.main_job import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    work = tmp_path_factory.mktemp("main-job")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)  # outputs/ and .cache/ land here
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(
                ["--sites", "2", "--patients", "6", "--size", "tiny", "--data", str(work / "fed"),
                 "--config", str(ROOT / "presets" / "tiny.toml"), "--run-name", "job"]
            )  # fmt: skip
    return rc, out.getvalue(), work / "outputs" / "job"


@pytest.mark.slow
def test_the_table_shows_patient_level_intervals_for_every_column(simulated):
    rc, stdout, run_dir = simulated
    assert rc == 0
    summary = json.loads((run_dir / "comparison.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    pooled = summary["pooled-patient-level"]
    assert set(pooled) == {"federated", "centralized", "local-only"}
    results = json.loads((run_dir / "results.json").read_text())
    for name, figures in pooled.items():
        assert figures["hips"] == results["test"]["n-hips"], name  # the same held-out hips
        assert 0 < figures["patients"] <= figures["hips"]  # patients, not hips, are resampled
        assert len(figures["sensitivity"]) == 4 and sum(map(sum, figures["confusion"])) == figures["hips"]
        assert set(figures["adjacent-auroc"]) == {"I-II", "II-III", "III-IV"}  # neighbouring stages ordered?
        interval = figures["ci95"].get("macro-auroc")
        if interval:
            assert interval[0] <= figures["macro-auroc"] <= interval[1]
    # The same model on the same hips as the server's pooled test: the same predicted stages. (Its
    # AUROC comes from 200-bin histograms here, the tiny preset's; ties in a bin move a tiny set's.)
    assert pooled["federated"]["accuracy"] == pytest.approx(results["test"]["accuracy"], abs=1e-9)
    assert "pooled, 95% CI (patients resampled)" in stdout
    # Paired differences on the same hips, the same patient draws for both models.
    for other in ("centralized", "local-only"):
        paired = pooled["federated"][f"minus {other}"]
        assert set(paired) == {"difference", "ci95", "p"} and 0 <= paired["p"] <= 1
        assert f"federated minus {other}: macro AUROC" in stdout
    table = (run_dir / "comparison.md").read_text()
    assert "pooled, 95% CI (patients resampled)" in table and "balanced accuracy" in table


@pytest.mark.slow
def test_a_benchmark_scores_a_finished_run_without_training_it_again(simulated):
    from benchmarks.harness import delivered_federated
    from common.config import load_run_config

    _, _, run_dir = simulated
    work = run_dir.parents[1]
    cfg = load_run_config(
        ROOT / "presets" / "tiny.toml",
        data_root=str(work / "fed"),
        run_name="job",
        cache_dir=str(work / ".cache" / "onfh"),
        output_dir=str(work / "outputs"),
    )
    final = run_dir / "final_model.npz"
    before = final.stat().st_mtime_ns
    scored = delivered_federated(cfg, sorted((work / "fed").glob("site-*")))
    assert final.stat().st_mtime_ns == before  # continued, not trained again
    pooled = json.loads((run_dir / "comparison.json").read_text())["pooled-patient-level"]["federated"]
    assert len(scored.labels) == pooled["hips"]
    assert scored.summary()["macro-auroc"] == pytest.approx(pooled["macro-auroc"], abs=1e-9)
