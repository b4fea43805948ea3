"""The site data round trip of issue 2: synthetic DICOM -> load_site -> hips, pairs, labels, cache."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from common.sitedata.cache import CACHE_VERSION
from common.sitedata.dicom import scan_site
from common.sitedata.labels import split_patients
from common.sitedata.load import PREPROCESSING_MODULES, SiteData, load_site, patient_key, split_id

# Femoral-head centre error targets (issue 2), mm.
CENTRE_MEDIAN_MM = 2.0
CENTRE_WORST_MM = 4.0
# Registration error target at the femoral heads (CT-session mm), mm.
REGISTRATION_WORST_MM = 3.0


# ----------------------------------------------------------------------------- helpers


def sha256_tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``folder``."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def dicom_identifiers(folder: Path) -> set[str]:
    """PatientID, PatientName, accession number and every UID written in the DICOM of ``folder``."""
    found: set[str] = set()
    for path in folder.rglob("*"):
        if not path.is_file() or path.name in ("labels.csv", "protocols.toml"):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - non-DICOM files planted by a test
            continue
        for keyword in (
            "PatientID",
            "PatientName",
            "AccessionNumber",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "FrameOfReferenceUID",
        ):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 4:
                found.add(value)
    return found


def identifiers_in_cache(cache: Path, identifiers: set[str]) -> list[str]:
    """Identifiers found in any cache file name or content (UTF-8 and numpy's UTF-32 strings)."""
    hits = []
    for path in cache.rglob("*"):
        name_hits = [i for i in identifiers if i in path.name]
        hits += [f"name {path.name}: {i}" for i in name_hits]
        if path.is_file():
            data = path.read_bytes()
            for identifier in identifiers:
                if identifier.encode() in data or identifier.encode("utf-32-le") in data:
                    hits.append(f"content {path.name}: {identifier}")
    return hits


def read_truth(site_dir: Path) -> list[dict]:
    return json.loads(site_dir.with_name(f"{site_dir.name}.truth.json").read_text())


def copy_patients(site_dir: Path, out: Path, patient_ids: set[str]) -> Path:
    """Copy the files (and label rows) of some patients of a site, keeping paths and mtimes."""
    out.mkdir(parents=True)
    for path in sorted(site_dir.rglob("*")):
        if not path.is_file() or path.name == "labels.csv":
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.PatientID) in patient_ids:
            target = out / path.relative_to(site_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    with (site_dir / "labels.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["patient_id"] in patient_ids]
    with (out / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["patient_id", "side", "arco_stage"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def clone(site_dir: Path, cache: Path, out: Path) -> tuple[Path, Path]:
    """A copy of a loaded site and its cache (mtimes kept, so the cache still matches)."""
    shutil.copytree(site_dir, out / "site", copy_function=shutil.copy2)
    shutil.copytree(cache, out / "cache", copy_function=shutil.copy2)
    return out / "site", out / "cache"


def hip(site: SiteData, key: str, side: str) -> int:
    match = np.flatnonzero((site.patient_keys == key) & (site.sides == side))
    assert len(match) == 1, f"hip {key} {side} found {len(match)} times"
    return int(match[0])


# ----------------------------------------------------------------------------- a small site (fast)


@pytest.fixture(scope="module")
def small(tiny_federation: Path, tmp_path_factory) -> dict:
    """Two MR-only patients of site-00 copied out, loaded once (cold) into a module cache."""
    site00 = tiny_federation / "site-00"
    truth = [p for p in read_truth(site00) if not p["has_ct"]][:2]
    root = tmp_path_factory.mktemp("small")
    site_dir = copy_patients(site00, root / "site", {p["patient_id"] for p in truth})
    before = sha256_tree(site_dir)
    lines: list[str] = []
    site = load_site(site_dir, root / "cache", progress=lines.append)
    return {
        "site_dir": site_dir,
        "cache": root / "cache",
        "site": site,
        "truth": truth,
        "before": before,
        "progress": lines,
    }


def test_small_site_loads_every_hip_with_labels(small):
    site, truth = small["site"], small["truth"]
    salt = (small["cache"] / "pseudonym.salt").read_bytes()
    assert len(site.stages) == 2 * len(truth)
    assert site.images.shape == (4, 5, 8, 48, 48) and site.images.dtype == np.float32
    for patient in truth:
        key = patient_key(patient["patient_id"], salt)
        for side, hip_truth in patient["hips"].items():
            i = hip(site, key, side)
            expected = hip_truth["stage"] if hip_truth["labelled"] and hip_truth["stage"] > 0 else 0
            assert site.stages[i] == expected
            assert np.linalg.norm(site.centres[i] - hip_truth["centre_mm"]) <= CENTRE_WORST_MM
    assert len(small["progress"]) == len(truth)  # one progress line per patient
    assert all(type(k) is str and type(v) is str for k, v in site.split.items())
    assert {str(k) for k in site.patient_keys} <= set(site.split)
    assert site.problems.errors == []


def test_cached_reload_is_identical(small):
    lines: list[str] = []
    again = load_site(small["site_dir"], small["cache"], progress=lines.append)
    assert lines == []  # nothing re-processed
    first = small["site"]
    for name in ("images", "available", "stages", "confidence", "centres", "pairs_mr", "pairs_ct"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert list(again.patient_keys) == list(first.patient_keys)
    assert again.split == first.split
    assert [str(p) for p in again.problems] == [str(p) for p in first.problems]


def test_cache_holds_no_identifier(small):
    identifiers = dicom_identifiers(small["site_dir"])
    assert len(identifiers) > 10
    assert identifiers_in_cache(small["cache"], identifiers) == []


def test_cache_bucket_says_what_produced_it(small):
    (bucket,) = [p for p in small["cache"].iterdir() if p.is_dir()]
    described = json.loads((bucket / "settings.json").read_text())
    assert described["cache_version"] == CACHE_VERSION and bucket.name.startswith(f"v{CACHE_VERSION}-")
    assert described["settings_fingerprint"] in bucket.name and described["code_fingerprint"] in bucket.name
    assert described["settings"]["anchor_protocol"] == "T1_COR"
    assert {"common.sitedata.patient", "common.sitedata.dicom.decode"} <= set(described["code"])


def test_every_preprocessing_module_is_fingerprinted():
    """A new module of the site-data package changes cached hips unless it is the site check."""
    package = Path(PREPROCESSING_MODULES[-1].__file__).parent
    hashed = {Path(m.__file__).resolve() for m in PREPROCESSING_MODULES}
    modules = {p.resolve() for p in package.rglob("*.py") if p.name not in ("__init__.py", "check.py")}
    assert modules - hashed == set()


def test_touched_file_reprocesses_only_its_patient(small, tmp_path):
    site_dir, cache = clone(small["site_dir"], small["cache"], tmp_path)
    touched_id = small["truth"][0]["patient_id"]
    # A file of a series in use (touching an ignored localiser must not re-process anything).
    target = scan_site(site_dir).patients[touched_id].series["T1_COR"].files[0]
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    lines: list[str] = []
    again = load_site(site_dir, cache, progress=lines.append)
    assert len(lines) == 1
    salt = (cache / "pseudonym.salt").read_bytes()
    assert patient_key(touched_id, salt)[:8] in lines[0]
    np.testing.assert_array_equal(again.images, small["site"].images)
    assert len(list(cache.rglob("patient-*.npz"))) == 2  # the stale entry was replaced, not kept


def test_bad_input_is_reported_and_the_rest_loads(small, tmp_path, dicom_writers):
    site_dir, cache = clone(small["site_dir"], small["cache"], tmp_path)
    a_slice = next(iter(sorted(site_dir.rglob("*.dcm"))))
    (site_dir / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
    (site_dir / "truncated.dcm").write_bytes(a_slice.read_bytes()[:-500])
    (site_dir / "notes.txt").write_text("scanner export notes\n")
    dicom_writers["structured_report"](site_dir / "report" / "SR0001")
    labels = (site_dir / "labels.csv").read_text().splitlines()
    first_id = small["truth"][0]["patient_id"]
    rows = [line for line in labels[1:] if not line.startswith(f"{first_id},L,")]
    labels = [labels[0], *rows, f"{first_id},L,0", "NOBODY-0001,R,2", f"{first_id},X,7"]
    (site_dir / "labels.csv").write_text("\n".join(labels) + "\n")
    before = sha256_tree(site_dir)

    lines: list[str] = []
    site = load_site(site_dir, cache, progress=lines.append)

    assert lines == []  # the good patients came from the cache
    assert len(site.stages) == len(small["site"].stages)
    by_path = {p.path: p for p in site.problems}
    assert "corrupt.dcm" in by_path and by_path["corrupt.dcm"].severity != "info"
    assert "truncated" in by_path["truncated.dcm"].reason
    assert "notes.txt" in by_path
    assert "report/SR0001" in by_path and "not an image" in by_path["report/SR0001"].reason
    n_lines = len(labels)
    assert "matches no study" in by_path[f"labels.csv:{n_lines - 1}"].reason
    assert (
        "arco_stage" in by_path[f"labels.csv:{n_lines}"].reason
        or "side" in by_path[f"labels.csv:{n_lines}"].reason
    )
    assert all("\n" not in str(p) for p in site.problems)
    # Stage 0 is healthy: labelled, but not in the four-way task.
    salt = (cache / "pseudonym.salt").read_bytes()
    i = hip(site, patient_key(first_id, salt), "L")
    assert site.healthy[i] and site.stages[i] == 0
    assert site.stats["healthy_hips"] == 1
    staged = site.staging_set("train", "val", "test")[2]
    assert len(staged) == int((site.stages > 0).sum()) and set(staged) <= {1, 2, 3, 4}
    assert sha256_tree(site_dir) == before


def test_unexpected_failure_skips_the_patient(small, tmp_path, monkeypatch):
    import common.sitedata.patient as site_data

    def broken(volume):
        raise RuntimeError("simulated bug in localisation")

    monkeypatch.setattr(site_data, "localize_femoral_heads", broken)
    site = load_site(small["site_dir"], tmp_path / "cache")
    assert len(site.stages) == 0
    failures = [p for p in site.problems.errors if "simulated bug" in p.reason]
    assert len(failures) == 2
    folders = {p.folder for p in site.patients}
    assert {p.path for p in failures} == folders
    assert list((tmp_path / "cache").rglob("patient-*.npz")) == []  # failures are retried next time


@pytest.mark.slow
def test_parallel_cold_path_matches_serial(small, tmp_path):
    lines: list[str] = []
    site = load_site(small["site_dir"], tmp_path / "cache", workers=2, progress=lines.append)
    assert len(lines) == 2 and all("preprocessed" in line for line in lines)
    # A fresh cache has a fresh salt: compare hips by order of truth, not by key.
    np.testing.assert_allclose(np.sort(site.centres, axis=0), np.sort(small["site"].centres, axis=0))
    assert site.images.shape == small["site"].images.shape


def test_sources_untouched_and_bad_folders_raise_clearly(small, tmp_path):
    assert sha256_tree(small["site_dir"]) == small["before"]
    with pytest.raises(ValueError, match="does not exist"):
        load_site(tmp_path / "nowhere", tmp_path / "cache")
    with pytest.raises(ValueError, match="inside the site folder"):
        load_site(small["site_dir"], small["site_dir"] / "cache")
    assert sha256_tree(small["site_dir"]) == small["before"]


def test_empty_and_non_dicom_folders_give_problems_not_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    site = load_site(tmp_path / "empty", tmp_path / "cache-empty")
    assert len(site.stages) == 0 and site.problems.errors
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello")
    (junk / "b.bin").write_bytes(os.urandom(1000))
    (junk / "labels.csv").write_bytes(b"\xff\xfe\x00garbage")
    site = load_site(junk, tmp_path / "cache-junk")
    assert len(site.stages) == 0
    paths = {p.path for p in site.problems}
    assert {"a.txt", "b.bin", "labels.csv"} <= paths


# ----------------------------------------------------------------------------- the tiny federation (slow)


@pytest.fixture(scope="module")
def federation(tiny_federation: Path, tmp_path_factory) -> dict:
    """Both sites of the tiny federation, loaded cold with two workers (about 100 s on 2 cores)."""
    cache_root = tmp_path_factory.mktemp("fed-cache")
    before = {d.name: sha256_tree(d) for d in sorted(tiny_federation.glob("site-*")) if d.is_dir()}
    sites = {}
    for name in before:
        sites[name] = load_site(tiny_federation / name, cache_root / name, workers=2)
    return {"root": tiny_federation, "cache": cache_root, "sites": sites, "before": before}


def _truth_hips(federation: dict):
    """(site, truth patient, key, side, hip truth) for every hip of the truth JSON."""
    for name, site in federation["sites"].items():
        salt = (federation["cache"] / name / "pseudonym.salt").read_bytes()
        for patient in read_truth(federation["root"] / name):
            key = patient_key(patient["patient_id"], salt)
            for side, hip_truth in patient["hips"].items():
                yield site, patient, key, side, hip_truth


@pytest.mark.slow
def test_every_hip_of_the_truth_is_found(federation):
    expected = list(_truth_hips(federation))
    for site, _, key, side, _ in expected:
        hip(site, key, side)
    assert sum(len(s.stages) for s in federation["sites"].values()) == len(expected)


@pytest.mark.slow
def test_femoral_head_centre_error(federation):
    errors = np.array(
        [
            np.linalg.norm(site.centres[hip(site, key, side)] - np.asarray(h["centre_mm"]))
            for site, _, key, side, h in _truth_hips(federation)
        ]
    )
    print(
        f"centre error over {len(errors)} hips: median {np.median(errors):.2f} mm, worst {errors.max():.2f} mm"
    )
    assert np.median(errors) <= CENTRE_MEDIAN_MM
    assert errors.max() <= CENTRE_WORST_MM


@pytest.mark.slow
def test_labels_match_truth(federation):
    for site, _, key, side, h in _truth_hips(federation):
        i = hip(site, key, side)
        if h["labelled"] and h["stage"] > 0:
            assert site.stages[i] == h["stage"]
        else:
            assert site.stages[i] == 0
        assert bool(site.healthy[i]) == (h["labelled"] and h["stage"] == 0)


@pytest.mark.slow
def test_missing_protocol_is_masked_not_an_error(federation):
    site = federation["sites"]["site-01"]
    pdfs = site.protocols.index("PDFS_SAG")
    assert not site.available[:, pdfs].any()
    assert np.all(site.images[:, pdfs] == 0)
    assert site.available[:, site.protocols.index("T1_COR")].all()
    assert not any("PDFS_SAG" in p.reason for p in site.problems.errors)


@pytest.mark.slow
def test_ct_pairs_and_registration_error(federation):
    errors = []
    for site, patient, key, _side, h in _truth_hips(federation):
        has_pairs = key in set(site.pair_keys)
        assert has_pairs == patient["has_ct"]
        if patient["has_ct"]:
            truth_matrix = np.asarray(patient["ct_offset"]["matrix"])
            centre = np.r_[h["centre_mm"], 1.0]
            errors.append(np.linalg.norm((site.registration[key] @ centre - truth_matrix @ centre)[:3]))
    for site in federation["sites"].values():
        mr, ct = site.pair_set("train", "val", "test")
        assert len(mr) == len(site.pairs_mr) > 0 and mr.shape == ct.shape
        assert ct.min() >= -1 and ct.max() <= 1
    print(
        f"registration error at {len(errors)} heads: median {np.median(errors):.2f}, worst {max(errors):.2f} mm"
    )
    assert max(errors) <= REGISTRATION_WORST_MM


@pytest.mark.slow
def test_federation_cache_has_no_identifier_and_sources_are_untouched(federation):
    for name, before in federation["before"].items():
        site_dir = federation["root"] / name
        assert identifiers_in_cache(federation["cache"] / name, dicom_identifiers(site_dir)) == []
        assert sha256_tree(site_dir) == before


def test_damaged_cache_is_rebuilt_not_fatal(small, tmp_path):
    site_dir, cache = clone(small["site_dir"], small["cache"], tmp_path)
    for path in cache.rglob("site.*"):
        path.write_bytes(b"not what it was")
    lines: list[str] = []
    again = load_site(site_dir, cache, progress=lines.append)
    assert lines == []  # the patients' own cache files were still good
    np.testing.assert_array_equal(again.images, small["site"].images)


@pytest.mark.slow
def test_split_is_the_same_on_every_install(federation):
    """The split hangs on the patient IDs and the split seed, not on the cache's random salt,
    and a small site still trains and tests on what it has."""
    for name, site in federation["sites"].items():
        salt = (federation["cache"] / name / "pseudonym.salt").read_bytes()
        truth = read_truth(federation["root"] / name)
        having = {
            stage: [
                p for p in truth if any(h["labelled"] and h["stage"] == stage for h in p["hips"].values())
            ]
            for stage in (1, 2, 3, 4)
        }
        staged = [p for p in truth if any(p in having[stage] for stage in having)]
        with_ct = [p for p in truth if p["has_ct"]]
        expected = split_patients(
            [split_id(p["patient_id"]) for p in truth],
            seed=0,
            groups={
                "labelled": {split_id(p["patient_id"]) for p in staged},
                "with MR-CT pairs": {split_id(p["patient_id"]) for p in with_ct},
                **{f"stage {s}": {split_id(p["patient_id"]) for p in having[s]} for s in having},
            },
        )
        split = {p["patient_id"]: site.split[patient_key(p["patient_id"], salt)] for p in truth}
        assert split == {p["patient_id"]: expected[split_id(p["patient_id"])] for p in truth}
        assert "train" in {split[p["patient_id"]] for p in with_ct}
        assert {"train", "test"} <= {split[p["patient_id"]] for p in staged}
        assert len(site.pair_set("train")[0]) > 0


def test_split_fractions_hold_out_more_patients_for_test():
    """An evaluation federation's split (run config ``split-fractions``) on a site of 60 patients
    with both hips labelled in some: more test patients, a patient's hips in one split."""
    from common.sitedata.assemble import split_site

    split_of = {f"p{i}": f"id{i}" for i in range(60)}
    keys = [k for k in split_of for _ in (0, 1)]
    stages = np.array([(i // 2) % 5 for i in range(len(keys))])
    default = split_site(split_of, keys, stages, list(split_of)[:40], 0)
    held_out = split_site(split_of, keys, stages, list(split_of)[:40], 0, (0.3, 0.1, 0.6))
    tests = [sum(v == "test" for v in d.values()) for d in (default, held_out)]
    assert tests[0] < 20 and tests[1] >= 30
    assert set(held_out) == set(split_of)
