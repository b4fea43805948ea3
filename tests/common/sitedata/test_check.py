"""``onfh check``: exit codes and a report a hospital can act on, on real synthetic DICOM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.sitedata.check import main
from tests.common.sitedata.test_load import copy_patients, read_truth, sha256_tree


@pytest.fixture(scope="module")
def checked(tiny_federation: Path, tmp_path_factory) -> dict:
    """One MR-only patient of site-01 (which has no PDFS_SAG), checked once into a module cache."""
    site01 = tiny_federation / "site-01"
    patient = next(p for p in read_truth(site01) if not p["has_ct"])
    root = tmp_path_factory.mktemp("check")
    site_dir = copy_patients(site01, root / "site", {patient["patient_id"]})
    before = sha256_tree(site_dir)
    return {"site_dir": site_dir, "cache": root / "cache", "before": before, "patient": patient}


def run_check(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_of_a_usable_site(checked, capsys, tmp_path):
    summary = tmp_path / "check.json"
    code, out, err = run_check(
        capsys, checked["site_dir"], "--cache-dir", checked["cache"], "--workers", 1, "--json", summary
    )
    assert code == 0
    assert "Traceback" not in out + err
    assert "patients                  1 (1 studies)" in out
    assert "hips found                2" in out
    assert "missing PDFS_SAG: every patient (masked in training, not an error)" in out
    for protocol in ("T1_COR", "T2W_COR", "T1_AX", "T2W_AX"):
        assert f"{protocol:<12} {1:>16}   {0:>7}   {2:>12}" in out
    labelled = sum(1 for h in checked["patient"]["hips"].values() if h["labelled"] and h["stage"] > 0)
    assert f"labelled hips (ARCO)      {labelled} (" in out
    assert "localisation confidence   median" in out
    assert "0 patients with CT" in out
    assert "preprocessed" in err  # progress per patient
    data = json.loads(summary.read_text())
    assert data["stats"]["hips"] == 2 and data["stats"]["protocol_patients"]["PDFS_SAG"] == 0
    assert sha256_tree(checked["site_dir"]) == checked["before"]


def test_problems_name_the_file_and_the_fix(checked, capsys, tmp_path):
    site_dir = tmp_path / "site"
    shutil.copytree(checked["site_dir"], site_dir, copy_function=shutil.copy2)
    cache = tmp_path / "cache"
    shutil.copytree(checked["cache"], cache, copy_function=shutil.copy2)
    (site_dir / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    rows = (site_dir / "labels.csv").read_text().rstrip("\n").splitlines()
    rows.append(f"{checked['patient']['patient_id']},R,9")
    (site_dir / "labels.csv").write_text("\n".join(rows) + "\n")
    before = sha256_tree(site_dir)
    code, out, err = run_check(capsys, site_dir, "--cache-dir", cache)
    assert code == 0
    problem_lines = [
        line.strip() for line in out.splitlines() if line.strip().startswith(("ERROR", "WARNING"))
    ]
    broken = [line for line in problem_lines if "broken.dcm" in line]
    assert len(broken) == 1 and "->" in broken[0]
    stage_row = [line for line in problem_lines if f"labels.csv:{len(rows)}" in line]
    assert len(stage_row) == 1 and "'9'" in stage_row[0] and "-> write 1-4" in stage_row[0]
    assert "Traceback" not in out + err
    assert sha256_tree(site_dir) == before


def test_unreadable_labels_still_checks_the_images(checked, capsys, tmp_path):
    site_dir = tmp_path / "site"
    shutil.copytree(checked["site_dir"], site_dir, copy_function=shutil.copy2)
    (site_dir / "labels.csv").write_bytes(b"\xff\xfe\xfa not utf-8 \x81")
    code, out, err = run_check(capsys, site_dir, "--cache-dir", checked["cache"])
    assert code == 0
    assert "labelled hips (ARCO)      0" in out
    assert any("labels.csv: cannot read" in line for line in out.splitlines())
    assert "Traceback" not in out + err


def test_nonexistent_folder(capsys, tmp_path):
    code, out, err = run_check(capsys, tmp_path / "no-such-folder")
    assert code == 1
    assert "does not exist" in err and "Traceback" not in out + err


def test_empty_folder_is_nothing_usable(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    (tmp_path / "empty").mkdir()
    code, out, err = run_check(capsys, tmp_path / "empty")
    assert code == 1
    assert "Nothing usable" in out
    assert "no usable MR or CT series found" in out
    # The default cache is this user's (mode 0700), never beside or inside the hospital's export.
    (cache,) = (tmp_path / "user-cache" / "onfh" / "check").iterdir()
    assert cache.name.startswith("empty-") and cache.stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "user-cache"]
    assert list((tmp_path / "empty").iterdir()) == []


def test_folder_of_non_dicom_files(capsys, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("not an image")
    (junk / "scan.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    code, out, err = run_check(capsys, junk, "--cache-dir", tmp_path / "cache", "--verbose")
    assert code == 1
    assert "readme.txt: not a DICOM file" in out and "scan.jpg: not a DICOM file" in out
    assert "Traceback" not in out + err


def test_unwritable_cache_is_a_message(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    code, out, err = run_check(capsys, tmp_path / "empty", "--cache-dir", tmp_path / "a-file" / "cache")
    assert code == 2
    assert "--cache-dir" in err and "Traceback" not in out + err
