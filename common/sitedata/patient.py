"""One patient's preprocessing: MR volumes -> femoral heads -> hip crops -> CT registration and pairs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.problems import Problem, ProblemLog, first_line
from common.sitedata.dicom import PatientScan, load_volume
from common.sitedata.femoral_head import LocalizationError, localize_femoral_heads
from common.sitedata.hip_crop import crop_hip_protocols
from common.sitedata.registration import ct_pairs_for_hip, register_rigid
from common.sitedata.settings import PreprocessSettings
from common.sitedata.volume import Volume

SIDES: tuple[str, ...] = ("R", "L")


@dataclass
class PatientResult:
    """One patient preprocessed (what the patient cache file holds)."""

    key: str
    centres: dict[str, np.ndarray]
    images: dict[str, np.ndarray]
    available: dict[str, np.ndarray]
    confidence: dict[str, float]
    pairs_mr: np.ndarray
    pairs_ct: np.ndarray
    problems: list[Problem]
    registration: np.ndarray | None = None  # (4, 4) MR-session -> CT-session mm
    failed: bool = False  # an unexpected exception: never cached, retried on the next load


def process_patient(
    scan: PatientScan,
    key: str,
    settings: PreprocessSettings,
    manual_centres: dict[str, tuple[float, float, float]],
    where: str,
) -> PatientResult:
    """Volumes -> femoral heads -> crops -> CT pairs for one patient; data problems go to the result.

    Args:
        scan: the patient's series found by ``scan_site``.
        key: the patient's pseudonym.
        settings: protocols, crop grid, CT window, anchor protocol.
        manual_centres: side -> femoral-head centre (LPS mm) from labels.csv; overrides localisation.
        where: the patient's folder (relative to the site), for problem lines.
    """
    problems = ProblemLog()
    grid = settings.grid
    empty = np.zeros((0, grid.size, grid.size), np.float32)
    result = PatientResult(key, {}, {}, {}, {}, empty, empty.copy(), problems)
    wanted = set(settings.protocols) | {settings.anchor_protocol}
    volumes: dict[str, Volume] = {}
    for protocol, series in scan.series.items():
        if protocol == "CT" or protocol not in wanted:
            continue
        volume = load_volume(series, problems)
        if volume is not None:
            volumes[protocol] = volume
    anchor = volumes.get(settings.anchor_protocol)
    if anchor is None:
        anchor = next((v for v in volumes.values() if v.orientation == "COR"), None)
    heads = {}
    if anchor is not None and len(manual_centres) < len(SIDES):
        try:
            heads = localize_femoral_heads(anchor)
        except LocalizationError as exc:
            problems.add(
                where,
                f"femoral heads not found on the coronal MR ({exc})",
                "give the centres in labels.csv (fh_x_mm, fh_y_mm, fh_z_mm)",
            )
    elif anchor is None and len(manual_centres) < len(SIDES):
        found = ", ".join(sorted(volumes)) or "none"
        problems.add(
            where,
            f"no coronal MR series to localise the femoral heads (protocols loaded: {found})",
            f"export a coronal T1 series ({settings.anchor_protocol}), or give the centres in labels.csv",
        )
    for side in SIDES:
        if side in manual_centres:
            centre, confidence = np.asarray(manual_centres[side], float), 1.0
        elif side in heads:
            centre, confidence = heads[side].centre_mm, float(heads[side].confidence)
        else:
            continue
        crops = crop_hip_protocols(volumes, centre, side, settings)
        for note in crops.notes:
            problems.add(where, note, "check the series' field of view", "warning")
        if not crops.available.any():
            if volumes:
                problems.add(
                    where,
                    f"{side} hip: no protocol covers the femoral head; hip skipped",
                    "check that the series cover both hips, or the centre given in labels.csv",
                )
            continue
        result.centres[side] = np.asarray(centre, np.float64)
        result.images[side] = crops.image
        result.available[side] = crops.available
        result.confidence[side] = confidence
    if "CT" in scan.series and result.centres:
        pair_with_ct(scan, volumes, anchor, settings, where, result)
    return result


def pair_with_ct(
    scan: PatientScan,
    volumes: dict[str, Volume],
    anchor: Volume | None,
    settings: PreprocessSettings,
    where: str,
    result: PatientResult,
) -> None:
    """Register the patient's CT to the anchor MR and cut MR/CT slice pairs into ``result``."""
    problems = result.problems
    ct = load_volume(scan.series["CT"], problems)
    if ct is None:
        return
    if anchor is None:
        problems.add(where, "CT not paired: no coronal MR to register it to", "export a coronal T1 series")
        return
    try:
        registration = register_rigid(anchor, ct, centres_mm=list(result.centres.values()))
    except ValueError as exc:
        problems.add(
            scan.series["CT"].relpath(),
            f"CT not paired: registration to the MR failed ({first_line(exc)})",
            "check that the CT covers the hips",
        )
        return
    mr_parts, ct_parts = [], []
    for side, centre in result.centres.items():
        mr, ct_slices = ct_pairs_for_hip(volumes, ct, registration.matrix, centre, side, settings)
        mr_parts.append(mr)
        ct_parts.append(ct_slices)
    result.pairs_mr = np.concatenate(mr_parts).astype(np.float32)
    result.pairs_ct = np.concatenate(ct_parts).astype(np.float32)
    result.registration = np.asarray(registration.matrix, np.float64)
    if len(result.pairs_mr) == 0:
        problems.add(
            scan.series["CT"].relpath(),
            "CT not paired: after registration the CT does not cover the hip boxes",
            "check that the CT and MR show the same hips",
        )


def process_patient_safely(
    scan: PatientScan,
    key: str,
    settings: PreprocessSettings,
    manual_centres: dict[str, tuple[float, float, float]],
    where: str,
) -> PatientResult:
    """:func:`process_patient`, turning any unexpected exception into a problem for this patient."""
    try:
        return process_patient(scan, key, settings, manual_centres, where)
    except Exception as exc:  # noqa: BLE001 - one patient's failure must not stop the site
        return failed_result(key, settings, where, exc)


def failed_result(key: str, settings: PreprocessSettings, where: str, exc: BaseException) -> PatientResult:
    """An empty result whose one error names the exception (never cached: retried on the next load)."""
    grid = settings.grid
    empty = np.zeros((0, grid.size, grid.size), np.float32)
    problems = ProblemLog()
    problems.add(
        where,
        f"preprocessing failed ({type(exc).__name__}: {first_line(exc)}); patient skipped",
        "check this study's series (re-export from PACS); if it persists, report this line to the "
        "onfh maintainers",
        "error",
    )
    return PatientResult(key, {}, {}, {}, {}, empty, empty.copy(), problems, failed=True)
