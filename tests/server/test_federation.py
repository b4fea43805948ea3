"""End to end: both phases in Flower's Ray simulation runtime on two synthetic hospitals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from common.config import load_run_config

PRESETS = Path(__file__).resolve().parents[2] / "presets"


def tiny_config(federation: Path, out: Path, **overrides):
    return load_run_config(
        PRESETS / "tiny.toml",
        data_root=str(federation),
        cache_dir=str(out / "cache"),
        output_dir=str(out / "outputs"),
        min_sites=1,
        **overrides,
    )


@pytest.fixture(scope="module")
def federated_run(tiny_federation, tmp_path_factory):
    from simulation.main_job import run_federated

    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tiny_federation, out, run_name="e2e", tracking="tensorboard")
    results = run_federated(cfg, n_sites=2)
    return cfg, results


def assert_auroc_defined_where_it_can_be(test: dict) -> None:
    """The pooled AUROC is in [0, 1] when the test hips hold two stages or more, else undefined.

    Splits are drawn per site from its own salt, so a tiny site may hold a single test stage.
    """
    confusion = test.get("confusion", [0] * 16)
    stages_present = sum(1 for i in range(4) if sum(confusion[4 * i : 4 * i + 4]) > 0)
    if stages_present >= 2:
        assert 0.0 <= test["macro-auroc"] <= 1.0
    else:
        assert test["macro-auroc"] != test["macro-auroc"]  # NaN


def test_two_phase_run_writes_results(federated_run):
    cfg, results = federated_run
    run_dir = cfg.run_dir
    for name in ("results.json", "final_model.npz", "metrics.jsonl", "checkpoint.npz", "pretrain_model.npz"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "roc_per_stage.png").stat().st_size > 1000
    assert (run_dir / "confusion_matrix.png").stat().st_size > 1000
    history = results["history"]
    assert [r["round"] for r in history["pretrain"]] == [1]
    assert [r["round"] for r in history["stage"]] == [1]
    pretrain_eval = history["pretrain"][0]["evaluate"]
    # A tiny site with fewer than three MR-CT patients has no validation pairs; the MAE is
    # reported whenever some site has them.
    if pretrain_eval["num-examples"] > 0:
        assert pretrain_eval["mae-hu"] > 0
    else:
        assert "mae-hu" not in pretrain_eval
    test = results["test"]
    assert_auroc_defined_where_it_can_be(test)
    # Under secure aggregation (the default) the pooled figures come from the masked sum of both
    # sites' evaluations, which covers every labelled test hip; no site's own figures exist.
    inventory = results["history"]["inventory"]
    assert test["n-hips"] == sum(c["labelled-test"] for c in inventory.values()) > 0
    assert test["secure-aggregation"]["sites"] == ["site-00", "site-01"] and test["sites"] == {}
    assert results["failures"] == [], results["failures"]
    model = np.load(run_dir / "final_model.npz")
    assert any(k.startswith("encoder.") for k in model.files)


def test_tracking_store_holds_the_rounds_of_metrics_jsonl(federated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, results = federated_run
    events = EventAccumulator(str(cfg.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    lines = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        for key, value in line["evaluate"].items():
            if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
                scalars = {e.step: e.value for e in events.Scalars(f"{line['phase']}/evaluate/{key}")}
                assert scalars[line["round"]] == pytest.approx(value, rel=1e-6), (line["phase"], key)
    assert "test/n-hips" in tags
    assert events.Scalars("test/n-hips")[0].value == results["test"]["n-hips"]


def dicom_identifiers(federation: Path) -> set[str]:
    """PatientID, PatientName, study and series UIDs and accession numbers of the federation's DICOM."""
    identifiers = set()
    for path in federation.rglob("*"):
        if path.is_file() and path.suffix not in (".csv", ".json"):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            identifiers.update(
                {
                    str(ds.PatientID),
                    str(ds.PatientName),
                    str(ds.StudyInstanceUID),
                    str(ds.SeriesInstanceUID),
                    str(getattr(ds, "AccessionNumber", "")),
                }
            )
    identifiers.discard("")
    return identifiers


def test_server_outputs_hold_no_patient_identifier(federated_run, tiny_federation):
    cfg, _ = federated_run
    identifiers = dicom_identifiers(tiny_federation)
    assert len(identifiers) > 10
    written = "".join(p.read_bytes().decode("latin-1") for p in cfg.run_dir.rglob("*") if p.is_file())
    leaked = [i for i in identifiers if i in written]
    assert leaked == []


def test_rounds_record_bytes_and_times(federated_run):
    """Each round's entry carries the bytes of the real messages per site and the round's times."""
    cfg, results = federated_run
    model_bytes = results["model-bytes"]  # float32 run: the exchanged state's size
    for phase in ("pretrain", "stage"):
        (entry,) = results["history"][phase]
        sent, received = entry["bytes"]["train-sent"], entry["bytes"]["train-received"]
        assert set(sent) == set(received) == {"site-00", "site-01"}
        assert set(sent.values()) == {model_bytes[phase]}
        # A masked update: one uint32 per shared weight, and the site's weight and weighted loss.
        assert set(received.values()) == {model_bytes[phase] + 8}
        assert set(entry["bytes"]["evaluate-sent"].values()) == {model_bytes[phase]}
        seconds = entry["seconds"]
        assert 0 < seconds["aggregate"] < seconds["train"] < seconds["round"]
        assert set(entry["site-train-seconds"]) == {"site-00", "site-01"}
    lines = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["phase"] for line in lines] == ["pretrain", "stage"]
    assert all("bytes" in line and "round" in line["seconds"] for line in lines)


def test_fedbn_run_keeps_norm_layers_at_the_sites(tiny_federation, tmp_path):
    """FedBN over two staging rounds: the sites' own norm layers come back from the site's own store
    in round 2 and in every evaluation, and never reach the server's model."""
    from common.models.factory import build_staging
    from common.training.weights import local_norm_keys
    from simulation.main_job import run_federated

    cfg = tiny_config(
        tiny_federation, tmp_path, run_name="fedbn", fedbn=True, pretrain_rounds=1, stage_rounds=2
    )
    results = run_federated(cfg, n_sites=2)
    assert results["failures"] == [], results["failures"]
    assert [r["round"] for r in results["history"]["stage"]] == [1, 2]
    assert all(r["train-sites"] == 2 for r in results["history"]["stage"])
    assert all("evaluate" in r for r in results["history"]["stage"])
    # The server never received a site's norm layers: its model keeps them as initialised
    # (BatchNorm statistics at 0 and 1), while the shared weights moved.
    model = np.load(cfg.run_dir / "final_model.npz")
    initial = build_staging(cfg.model).state_dict()
    norm = local_norm_keys(build_staging(cfg.model))
    stats = [k for k in norm if k.endswith(("running_mean", "running_var"))]
    assert stats
    for key in stats:
        np.testing.assert_array_equal(model[key], initial[key].numpy(), err_msg=key)
    shared = [k for k in model.files if k not in norm and k.endswith("weight")]
    assert any(not np.allclose(model[k], initial[k].numpy()) for k in shared)
    # Each site received a personalised model: the global weights with its own layers of the
    # model's round (the best-validated one under select-on-val).
    card_path = delivered_folder(cfg, "site-00") / "model_card.json"
    model_round = json.loads(card_path.read_text())["run"]["model-round"]
    for site in ("site-00", "site-01"):
        folder = delivered_folder(cfg, site)
        card = json.loads((folder / "model_card.json").read_text())
        assert card["site"] == {**card["site"], "name": site, "personalised": True}
        mine = np.load(folder / "final_model.npz")
        layers = np.load(
            Path(cfg.cache_dir) / site / "fedbn" / "fedbn" / "stage" / f"round-{model_round:04d}.npz"
        )
        for key in layers.files:
            np.testing.assert_array_equal(mine[key], layers[key], err_msg=key)
        for key in shared:
            np.testing.assert_array_equal(mine[key], model[key], err_msg=key)


def delivered_folder(cfg, site: str) -> Path:
    """Where a simulated site keeps a delivered model: ``SITE-models/RUN`` beside its cache folder."""
    return Path(cfg.cache_dir) / f"{site}-models" / cfg.run_name


def test_every_site_receives_the_model_and_a_card_without_identifiers(federated_run, tiny_federation):
    from common.predict import load_model

    cfg, results = federated_run
    assert results["delivery"] == {"sites": ["site-00", "site-01"], "failed": {}}
    secrets = dicom_identifiers(tiny_federation)
    for site in ("site-00", "site-01"):
        folder = delivered_folder(cfg, site)
        assert {p.name for p in folder.iterdir()} == {
            "final_model.npz", "global_model.npz", "run_config.json", "model_card.json", "model_card.md"
        }  # fmt: skip
        net, _, notes = load_model(folder)  # what 'onfh predict --model FOLDER' reads
        assert notes == []
        card = json.loads((folder / "model_card.json").read_text())
        # Under FedBN (the default) each site's copy carries its own normalisation layers.
        assert card["site"]["name"] == site and card["site"]["personalised"] is cfg.fedbn
        assert set(card["sites"]) == {"site-00", "site-01"}
        assert card["metrics"]["test hips"] == results["test"]["n-hips"]
        assert "does not detect ONFH" in card["intended-use"]
        for key, (low, high) in card["metrics-ci95"].items():  # from the pooled histograms
            assert low <= card["metrics"][key] + 1e-9 and card["metrics"][key] <= high + 1e-9, key
        # the site's own test of its copy, patients resampled, computed where the hips are
        validation = card["site"]["validation"]
        by_stage = card["site"]["labelled-hips-by-stage"]
        assert [sum(by_stage[s]) for s in ("train", "val", "test")] == [
            card["sites"][site][f"labelled-{s}"] for s in ("train", "val", "test")
        ]
        test_hips = card["sites"][site]["labelled-test"]
        assert validation["hips"] == test_hips if test_hips else "error" in validation
        text = (folder / "model_card.md").read_text() + (folder / "model_card.json").read_text()
        assert not [i for i in secrets if i in text]
        assert str(tiny_federation) not in text
