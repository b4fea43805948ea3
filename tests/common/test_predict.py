"""``onfh predict``: per-hip probabilities, attention weights, the figure, and clear errors."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.config import load_run_config
from common.predict import load_model, main, predict_study
from common.sitedata.load import load_site
from common.training.centralized import save_model, train_two_phase
from common.training.weights import get_shared_state
from tests.common.training.test_centralized import shared_cache, write_test_preset

HIP_LINE = re.compile(r"^hip (\S+): stage (I|II|III|IV) if ONFH\s+\((.*)\)$")
ATTENTION_LINE = re.compile(r"^\s+protocol attention: (.*)$")


def run_cli(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tiny_federation, tmp_path_factory) -> Path:
    """A staging model trained on site-00 of the tiny federation, saved as ``onfh train`` does."""
    work = tmp_path_factory.mktemp("predict")
    cfg = load_run_config(write_test_preset(work / "test.toml"))
    site = load_site(
        tiny_federation / "site-00", shared_cache(tmp_path_factory) / "site-00", cfg.preprocess, workers=2
    )
    net, info = train_two_phase([site], cfg)
    save_model(net, cfg, work / "run", {"train": info})
    return work / "run"


@pytest.fixture(scope="module")
def study(tiny_federation) -> Path:
    """One patient's folder (DICOM only, no labels.csv)."""
    return sorted(p for p in (tiny_federation / "site-00").iterdir() if p.is_dir())[0]


def test_predict_prints_probabilities_and_attention_and_writes_png(run_dir, study, tmp_path):
    png = tmp_path / "figures" / "hips.png"
    rc, stdout, stderr = run_cli([study, "--model", run_dir, "--png", png])
    assert rc == 0, stderr
    lines = stdout.splitlines()
    hip_lines = [i for i, line in enumerate(lines) if HIP_LINE.match(line)]
    assert len(hip_lines) == 2  # both hips of the patient
    sides = set()
    for i in hip_lines:
        name, stage, probs_text = HIP_LINE.match(lines[i]).groups()
        sides.add(name[-1])
        probs = {k: float(v) for k, v in re.findall(r"(I{1,3}|IV): ([0-9.]+)", probs_text)}
        assert list(probs) == ["I", "II", "III", "IV"]
        assert sum(probs.values()) == pytest.approx(1.0, abs=3e-3)  # printed to 3 decimals
        assert stage == max(probs, key=probs.get)
        weights = dict(re.findall(r"(\w+) ([0-9.]+)", ATTENTION_LINE.match(lines[i + 1]).group(1)))
        assert set(weights) == {"T1_COR", "T2W_COR", "T1_AX", "T2W_AX", "PDFS_SAG"}
        assert sum(float(w) for w in weights.values()) == pytest.approx(1.0, abs=3e-3)
    assert sides == {"L", "R"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"attention figure: {png}" in stdout
    assert "labels" not in stderr  # a study needs no labels.csv: no warning about it


def test_predict_study_returns_exact_probabilities(run_dir, study):
    hips = predict_study(study, run_dir, png=None)
    assert sorted(h["side"] for h in hips) == ["L", "R"]
    for hip in hips:
        assert sum(hip["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
        assert all(0.0 <= p <= 1.0 for p in hip["probabilities"].values())
        attention = np.array(list(hip["protocol_attention"].values()))
        assert attention.sum() == pytest.approx(1.0, abs=1e-5) and (attention >= 0).all()


def test_bad_model_folder_exits_2_naming_the_file(study, tmp_path):
    rc, stdout, stderr = run_cli([study, "--model", tmp_path, "--png", tmp_path / "x.png"])
    assert rc == 2
    assert "run_config.json not found" in stderr and "onfh train" in stderr
    assert "Traceback" not in stdout + stderr and not (tmp_path / "x.png").exists()


def test_model_that_does_not_fit_its_config_exits_2(run_dir, study, tmp_path):
    mismatched = tmp_path / "run"
    shutil.copytree(run_dir, mismatched)
    config = json.loads((mismatched / "run_config.json").read_text())
    (mismatched / "run_config.json").write_text(json.dumps({**config, "fusion": "plain"}))
    rc, _, stderr = run_cli([study, "--model", mismatched, "--png", tmp_path / "x.png"])
    assert rc == 2 and "does not fit the model" in stderr and "Traceback" not in stderr
    (mismatched / "final_model.npz").write_bytes(b"not a zip")
    rc, _, stderr = run_cli([study, "--model", mismatched, "--png", tmp_path / "x.png"])
    assert rc == 2 and "cannot be read" in stderr


def test_empty_study_folder_exits_2_with_a_message(run_dir, tmp_path):
    empty = tmp_path / "study"
    empty.mkdir()
    rc, stdout, stderr = run_cli([empty, "--model", run_dir, "--png", tmp_path / "x.png"])
    assert rc == 2
    assert "no femoral head could be cropped" in stderr and "onfh check" in stderr
    assert "Traceback" not in stdout + stderr


def test_missing_study_folder_exits_2(run_dir, tmp_path):
    rc, _, stderr = run_cli([tmp_path / "nowhere", "--model", run_dir])
    assert rc == 2 and "does not exist" in stderr


def test_load_model_reads_federated_weights_and_flags_fedbn(run_dir, tmp_path):
    trained, _, _ = load_model(run_dir)
    federated = tmp_path / "run"
    shutil.copytree(run_dir, federated)
    # What the server saves: the exchanged tensors (no batch-norm step counters).
    np.savez(federated / "final_model.npz", **get_shared_state(trained, fedbn=False))
    net, _, notes = load_model(federated)
    assert notes == [] and not net.training
    # Under FedBN the normalisation layers never reach the server: load, but say so.
    np.savez(federated / "final_model.npz", **get_shared_state(trained, fedbn=True))
    _, _, notes = load_model(federated)
    assert len(notes) == 1 and "FedBN" in notes[0]


def test_a_healthy_hip_gets_the_scope_statement_never_a_bare_stage(run_dir, study, tiny_federation):
    """The four-way model has no answer for "no ONFH": a healthy hip of the phantom (stage 0 in the
    truth file) is staged like any other, so the output says what the model is for, once at the
    top and on every stage line."""
    truth = {p["patient_id"]: p for p in json.loads((tiny_federation / "site-00.truth.json").read_text())}
    healthy = [side for side, hip in truth[study.name]["hips"].items() if hip["stage"] == 0]
    if not healthy:  # the study's patient has ONFH in both hips: find one with a healthy hip
        study = next(
            tiny_federation / "site-00" / pid
            for pid, p in truth.items()
            if any(h["stage"] == 0 for h in p["hips"].values())
            and (tiny_federation / "site-00" / pid).is_dir()
        )
        healthy = [side for side, hip in truth[study.name]["hips"].items() if hip["stage"] == 0]
    rc, out, _ = run_cli([study, "--model", run_dir, "--png", run_dir.parent / "healthy.png"])
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("scope: this model stages hips already diagnosed with ONFH")
    assert "does not detect ONFH" in lines[0]
    stage_lines = [line for line in lines if line.startswith("hip ")]
    assert stage_lines and all(HIP_LINE.match(line) for line in stage_lines)  # "stage X if ONFH"
    sides = {line.split(":")[0].rsplit("-", 1)[-1] for line in stage_lines}
    assert set(healthy) <= sides  # the healthy hip was staged, and said so with the qualifier
    hips = predict_study(study, run_dir, None)
    assert all(h["scope"].startswith("scope: this model stages") for h in hips)
