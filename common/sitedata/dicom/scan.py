"""Finding every usable MR/CT series of a site folder from headers alone, grouped by patient and protocol."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from common.problems import ProblemLog
from common.sitedata.dicom.header import Header, read_header
from common.sitedata.dicom.limits import DEFAULT_LIMITS, DicomLimits
from common.sitedata.dicom.model import PatientScan, SeriesInfo, SiteScan, relative
from common.sitedata.dicom.series import build_series
from common.sitedata.protocols import ProtocolRules, ProtocolRulesError

# Files of the site folder convention that are not DICOM and need no note.
SITE_FILES: frozenset[str] = frozenset({"labels.csv", "protocols.toml"})


def scan_site(
    site_dir: Path,
    rules: ProtocolRules | None = None,
    log: ProblemLog | None = None,
    limits: DicomLimits = DEFAULT_LIMITS,
) -> SiteScan:
    """Find every usable MR/CT series below ``site_dir`` from headers alone.

    Walks all files (any depth, any names), reads headers (pixel data is not read), groups
    instances into series by SeriesInstanceUID and series into patients by PatientID, checks
    each series' geometry and maps it to a protocol key. Nothing raises for bad input: each
    problem becomes one line in ``scan.problems`` (also appended to ``log`` when given).

    Args:
        site_dir: the site's data folder.
        rules: protocol rules; None reads ``site_dir/protocols.toml`` if present, else defaults.
        log: optional shared problem log.
        limits: the most a file or series may hold; a file over them is refused (one problem
            line naming it, the limit and the value) and the rest of the site is read.

    Returns:
        The :class:`SiteScan`; source files are opened read-only and never modified.
    """
    site_dir = Path(site_dir)
    problems = log if log is not None else ProblemLog()
    if rules is None:
        rules = _site_rules(site_dir, problems)
    scan = SiteScan(site_dir=site_dir, problems=problems, rules=rules)
    headers = _read_headers(scan, limits)
    for series_headers in headers.values():
        series = build_series(series_headers, site_dir, rules, problems, limits)
        if series is None:
            scan.ignored += len(series_headers)
            continue
        patient = scan.patients.setdefault(series.patient_id, PatientScan(series.patient_id))
        patient.study_uids.add(series.study_uid)
        if series.protocol is None:
            patient.unmapped.append(series)
            problems.add(
                series.relpath(),
                f"series '{series.description}' ({series.modality}, {series.orientation}, "
                f"{series.n_slices} slices) matches no protocol rule; not used",
                "nothing to do unless it should be used: then add a rule to protocols.toml",
                "info",
            )
            continue
        _keep_largest(patient, series, problems)
    scan.patients = dict(sorted(scan.patients.items()))
    return scan


def _read_headers(scan: SiteScan, limits: DicomLimits) -> dict[str, list[Header]]:
    """Every file's header, by SeriesInstanceUID; counts files in ``scan``, notes skipped objects."""
    site_dir, problems = scan.site_dir, scan.problems
    headers: dict[str, list[Header]] = defaultdict(list)
    skipped: dict[tuple[str, str], list[Path]] = defaultdict(list)  # (series, reason) -> files
    for path in _walk(site_dir):
        scan.n_files += 1
        header = read_header(path, site_dir, problems, skipped, limits)
        if header is None:
            scan.ignored += 1
            continue
        scan.n_dicom += 1
        headers[header.series_uid].append(header)
    for (_, reason), paths in skipped.items():
        count = f"{len(paths)} files" if len(paths) > 1 else "file"
        problems.add(
            relative(paths[0], site_dir),
            f"{count} skipped: {reason}",
            "nothing to do if this object is not an MR/CT image; otherwise re-export it as an image",
            "info",
        )
    return headers


def _site_rules(site_dir: Path, problems: ProblemLog) -> ProtocolRules:
    """The site's protocols.toml if present and valid; a bad file is an error and defaults are used."""
    path = site_dir / "protocols.toml"
    if not path.is_file():
        return ProtocolRules.default()
    try:
        return ProtocolRules.from_toml(path)
    except ProtocolRulesError as exc:
        problems.add("protocols.toml", f"{exc.reason}; default rules used instead", exc.fix, "error")
        return ProtocolRules.default()


def _walk(site_dir: Path) -> list[Path]:
    """All regular files below ``site_dir`` (sorted, deterministic), without the site's own files."""
    found = []
    for root, dirs, files in os.walk(site_dir):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if Path(root) == site_dir and name in SITE_FILES:
                continue
            if path.is_file():
                found.append(path)
    return found


def _keep_largest(patient: PatientScan, series: SeriesInfo, problems: ProblemLog) -> None:
    """Use ``series`` for its protocol key unless the patient already has a larger one."""
    key = series.protocol
    current = patient.series.get(key)
    if current is None:
        patient.series[key] = series
        return
    kept, dropped = (series, current) if series.n_slices > current.n_slices else (current, series)
    patient.series[key] = kept
    problems.add(
        dropped.relpath(),
        f"series '{dropped.description}' ({dropped.n_slices} slices) also maps to {key}; "
        f"the one with {kept.n_slices} slices ({kept.relpath()}) is used",
        "nothing to do, or narrow the rule in protocols.toml",
        "info",
    )
