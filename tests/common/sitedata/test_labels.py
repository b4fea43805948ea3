"""Tests of labels.csv reading, label-vs-study checks and the patient-level split."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.problems import ProblemLog
from common.sitedata.assemble import join_labels
from common.sitedata.dicom import scan_site
from common.sitedata.labels import (
    HipLabel,
    parse_stage,
    read_labels,
    split_patients,
)
from common.sitedata.privacy import patient_key
from tests.common.conftest import write_series


def write_labels(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_reads_rows_with_tolerant_header(tmp_path: Path) -> None:
    path = write_labels(
        tmp_path,
        " Patient ID ,SIDE,ARCO Stage,FH x mm,FH-Y-mm,fh_z_mm\n"
        "P1,L,2,,,\n"
        "P1,r,,-90.5,12,30\n"
        "P2,left,IV,,,\n"
        "\n"
        "P2,R,0,,,\n",
    )
    log = ProblemLog()
    labels = read_labels(path, log)
    assert not log
    assert labels == [
        HipLabel("P1", "L", 2, None, 2),
        HipLabel("P1", "R", None, (-90.5, 12.0, 30.0), 3),
        HipLabel("P2", "L", 4, None, 4),
        HipLabel("P2", "R", 0, None, 6),
    ]


def test_semicolon_spreadsheet_export(tmp_path: Path) -> None:
    path = write_labels(tmp_path, "\ufeffpatient_id;side;arco_stage\nP1;L;3\n")
    assert read_labels(path, ProblemLog()) == [HipLabel("P1", "L", 3, None, 2)]


@pytest.mark.parametrize(
    ("text", "stage"),
    [
        ("1", 1),
        ("4", 4),
        ("2.0", 2),
        ("III", 3),
        ("iiib", 3),
        ("3A", 3),
        ("ARCO II", 2),
        ("0", 0),
        (" ", None),
    ],
)
def test_stage_spellings_accepted(text: str, stage: int | None) -> None:
    assert parse_stage(text) == stage


@pytest.mark.parametrize("text", ["5", "0.5", "-1", "IVb", "V", "2b", "x"])
def test_impossible_stage_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_stage(text)


def test_bad_rows_skipped_with_line_and_fix(tmp_path: Path) -> None:
    path = write_labels(
        tmp_path,
        "patient_id,side,arco_stage,fh_x_mm,fh_y_mm,fh_z_mm\n"
        "P1,L,2,,,\n"  # 2 ok
        "P1,X,2,,,\n"  # 3 unknown side
        "P2,L,5,,,\n"  # 4 impossible stage
        "P2,R,0.5,,,\n"  # 5 impossible stage
        "P1,L,3,,,\n"  # 6 duplicate hip
        "P3,L,1,10,abc,3\n"  # 7 bad centre
        "P3,R,1,10,,\n"  # 8 partial centre
        ",L,1,,,\n"  # 9 no patient
        "P4,R,1,1,2,3\n",  # 10 ok
    )
    log = ProblemLog()
    labels = read_labels(path, log)
    assert [(label.patient_id, label.side) for label in labels] == [("P1", "L"), ("P4", "R")]
    assert [p.path for p in log] == [f"labels.csv:{n}" for n in (3, 4, 5, 6, 7, 8, 9)]
    assert "duplicate hip" in log[3].reason and "line 2" in log[3].reason
    assert "'5' is not an ARCO stage" in log[1].reason
    for problem in log:
        assert "\n" not in str(problem) and problem.fix and "P1" not in problem.reason


def test_missing_file_means_unlabelled(tmp_path: Path) -> None:
    log = ProblemLog()
    assert read_labels(tmp_path / "labels.csv", log) == []
    assert len(log) == 1 and log[0].path == "labels.csv" and "unlabelled" in log[0].reason


def test_missing_column_is_an_error(tmp_path: Path) -> None:
    log = ProblemLog()
    assert read_labels(write_labels(tmp_path, "patient,side,stage\nP1,L,2\n"), log) == []
    assert log[0].severity == "error" and "patient_id" in log[0].reason


def test_labels_naming_no_study(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_series(site / "a", patient_id="P1")
    write_series(site / "b", patient_id="P9", description="T1 TSE AX", orientation="AX")
    scan = scan_site(site)
    path = write_labels(site, "patient_id,side,arco_stage\nP1,L,2\nP1,R,1\nGHOST-7,L,3\n")
    log = ProblemLog()
    labels = read_labels(path, log)
    # What load_site joins the rows against: every scanned patient by salted key, here with both hips.
    salt = b"test salt"
    join_labels(labels, salt, {patient_key(pid, salt): {"L", "R"} for pid in scan.patients}, log)
    warning = [p for p in log if p.severity == "warning"]
    assert len(warning) == 1 and warning[0].path == "labels.csv:4" and "no study" in warning[0].reason
    assert "GHOST" not in str(warning[0])
    (note,) = [p for p in log if p.severity == "info"]
    assert "1 of 2 patients have no label row" in note.reason


def test_split_deterministic_and_stable_when_patients_added() -> None:
    keys = [f"key-{i:03d}" for i in range(200)]
    first = split_patients(keys, seed=7)
    assert first == split_patients(list(reversed(keys)), seed=7)
    more = split_patients(keys + [f"new-{i}" for i in range(50)], seed=7)
    assert all(more[k] == first[k] for k in keys)
    counts = {s: list(first.values()).count(s) for s in ("train", "val", "test")}
    assert 90 <= counts["train"] <= 150 and counts["val"] >= 20 and counts["test"] >= 20
    assert split_patients(keys, seed=8) != first


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_every_split_non_empty_from_three_patients(n: int) -> None:
    for seed in range(20):
        split = split_patients([f"p{i}" for i in range(n)], seed=seed)
        assert set(split.values()) == {"train", "val", "test"}


@pytest.mark.parametrize("n", [6, 8, 12])
def test_small_groups_get_train_then_test(n: int) -> None:
    """Inside each group (the labelled patients, the patients with MR-CT pairs) a small site still
    gets a training patient, then a test patient, then a validation one, whatever the hash drew."""
    keys = [f"p{i}" for i in range(n)]
    for seed in range(50):
        for with_pairs in ({keys[0]}, {keys[0], keys[5]}):
            groups = {"labelled": set(keys[1:5]), "with MR-CT pairs": with_pairs}
            split = split_patients(keys, seed=seed, groups=groups)
            assert set(split.values()) == {"train", "val", "test"}
            assert {split[k] for k in groups["labelled"]} == {"train", "val", "test"}
            assert {split[k] for k in with_pairs} == (
                {"train", "test"} if len(with_pairs) == 2 else {"train"}
            )


def test_groups_leave_a_large_site_alone() -> None:
    keys = [f"key-{i:03d}" for i in range(200)]
    groups = {"labelled": set(keys[::2]), "with MR-CT pairs": set(keys[::3])}
    assert split_patients(keys, seed=3, groups=groups) == split_patients(keys, seed=3)


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_patients(["a"], seed=0, fractions=(0.5, 0.5, 0.5))
