"""A site's hip labels (labels.csv) and the patient-level train/val/test split."""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from common.problems import ProblemLog

LABELS_FILE = "labels.csv"  # in the site folder
SPLITS: tuple[str, ...] = ("train", "val", "test")
REQUIRED_COLUMNS: tuple[str, ...] = ("patient_id", "side", "arco_stage")
CENTRE_COLUMNS: tuple[str, ...] = ("fh_x_mm", "fh_y_mm", "fh_z_mm")
SIDES = {"l": "L", "left": "L", "r": "R", "right": "R"}
ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4}
# Stage spellings accepted besides 0-4: Roman numerals I-IV, and the ARCO 2019 subtypes of
# stage III (IIIA, IIIB, 3A, 3B), which count as stage 3 in the four-way task.
_STAGE_SUBTYPE = re.compile(r"^(3|iii)\s*[ab]$")
CENTRE_LIMIT_MM = 2000.0  # a femoral-head centre farther than 2 m from the origin is a typo


@dataclass(frozen=True)
class HipLabel:
    """One hip of labels.csv.

    Attributes:
        patient_id: the PatientID of the patient's DICOM.
        side: ``"L"`` or ``"R"`` (patient's left / right).
        stage: ARCO stage 1-4; 0 for a healthy hip (not in the four-way task); None when blank.
        centre_mm: manual femoral-head centre in LPS mm, or None (localise automatically).
        line: line number in labels.csv, so problems can name the row without the patient ID.
    """

    patient_id: str
    side: str
    stage: int | None
    centre_mm: tuple[float, float, float] | None = None
    line: int = 0


def _column_name(name: str) -> str:
    """Header cell -> canonical name: case and spaces/dashes do not matter (``FH x mm`` -> ``fh_x_mm``)."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def parse_stage(text: str) -> int | None:
    """``"3"``, ``"III"``, ``"IIIB"``, ``"3a"`` -> 3; blank -> None.

    Raises:
        ValueError: for anything else (5, 0.5, IVb, "x").
    """
    value = text.strip().lower()
    if value.startswith("arco"):
        value = value[4:].strip()
    if not value:
        return None
    if value in ROMAN:
        return ROMAN[value]
    if _STAGE_SUBTYPE.match(value):
        return 3
    try:
        number = float(value)
    except ValueError:
        raise ValueError(text) from None
    if not number.is_integer() or not 0 <= number <= 4:
        raise ValueError(text)
    return int(number)


def _sniff_dialect(text: str) -> type[csv.Dialect] | csv.Dialect:
    """Comma by default; semicolon or tab files (spreadsheet exports) are recognised too."""
    try:
        return csv.Sniffer().sniff(text.splitlines()[0] if text else "", delimiters=",;\t")
    except csv.Error:
        return csv.excel


def read_labels(path: Path, log: ProblemLog) -> list[HipLabel]:
    """Read a site's labels.csv into one :class:`HipLabel` per valid row.

    Columns ``patient_id, side, arco_stage`` (required) and ``fh_x_mm, fh_y_mm, fh_z_mm``
    (optional, all three or none per row); header names ignore case and spaces. A bad row
    (unknown side, impossible stage, duplicate hip, bad centre, no patient_id) is skipped with a
    one-line problem ``labels.csv:LINE``. A missing or unusable file gives a problem and no labels
    (every hip is then unlabelled).
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        log.add(
            name,
            "no labels file; every hip is unlabelled",
            "write labels.csv (see docs/site-data.md)",
            "warning",
        )
        return []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        log.add(
            name,
            f"cannot read ({type(exc).__name__}); every hip is unlabelled",
            "save labels.csv as UTF-8 CSV",
            "error",
        )
        return []
    reader = csv.reader(text.splitlines(), _sniff_dialect(text))
    header = next(reader, None)
    if header is None:
        log.add(
            name,
            "empty file; every hip is unlabelled",
            "add a header row: patient_id,side,arco_stage",
            "error",
        )
        return []
    columns = [_column_name(cell) for cell in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        log.add(
            f"{name}:1",
            f"missing column(s) {', '.join(missing)} (found: {', '.join(columns)}); every hip is unlabelled",
            "the header must be patient_id,side,arco_stage[,fh_x_mm,fh_y_mm,fh_z_mm]",
            "error",
        )
        return []
    index = {
        column: columns.index(column) for column in REQUIRED_COLUMNS + CENTRE_COLUMNS if column in columns
    }

    labels: list[HipLabel] = []
    seen: dict[tuple[str, str], int] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        cells = {column: (row[i].strip() if i < len(row) else "") for column, i in index.items()}
        where = f"{name}:{line}"
        label = _parse_row(cells, line, where, log)
        if label is None:
            continue
        hip = (label.patient_id, label.side)
        if hip in seen:
            log.add(
                where,
                f"duplicate hip (same patient and side as line {seen[hip]}); row skipped",
                "keep one row per hip",
            )
            continue
        seen[hip] = line
        labels.append(label)
    return labels


def _parse_row(cells: dict[str, str], line: int, where: str, log: ProblemLog) -> HipLabel | None:
    patient_id = cells["patient_id"]
    if not patient_id:
        log.add(where, "empty patient_id; row skipped", "fill in the PatientID of the patient's DICOM")
        return None
    side = SIDES.get(cells["side"].lower())
    if side is None:
        log.add(
            where,
            f"side {cells['side']!r} is not L or R; row skipped",
            "write L or R (the patient's left or right)",
        )
        return None
    try:
        stage = parse_stage(cells["arco_stage"])
    except ValueError:
        log.add(
            where,
            f"arco_stage {cells['arco_stage']!r} is not an ARCO stage; row skipped",
            "write 1-4 (or I-IV, IIIA/IIIB), 0 for a healthy hip, or leave it blank if unknown",
        )
        return None
    centre_cells = [cells.get(c, "") for c in CENTRE_COLUMNS]
    centre = None
    if any(centre_cells):
        try:
            values = tuple(float(v) for v in centre_cells)
        except ValueError:
            values = ()
        if len(values) != 3 or not all(math.isfinite(v) and abs(v) < CENTRE_LIMIT_MM for v in values):
            log.add(
                where,
                f"femoral-head centre ({', '.join(centre_cells)}) is not three numbers in mm; row skipped",
                "give fh_x_mm, fh_y_mm, fh_z_mm in LPS mm, or leave all three blank",
            )
            return None
        centre = values
    return HipLabel(patient_id=patient_id, side=side, stage=stage, centre_mm=centre, line=line)


def _unit_hash(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by key and seed alone."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_patients(
    patient_keys: list[str],
    seed: int,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    groups: Mapping[str, Collection[str]] | None = None,
) -> dict[str, str]:
    """Assign each patient to ``"train"``, ``"val"`` or ``"test"`` (hips follow their patient).

    Each key's split depends only on a hash of (seed, key), so adding a patient never moves
    another, except where a split would be empty. A small site gets every split it can: with 3
    or more patients every split with a non-zero fraction gets at least one patient (the one
    hashed closest to that split), and the same holds inside each of ``groups`` (say, the
    labelled patients and the patients with MR-CT pairs); a group of one or two patients gets
    train first, then test. A patient is only moved where that empties no split a group needs.

    Raises:
        ValueError: fractions not three non-negative numbers summing to 1.
    """
    if (
        len(fractions) != 3
        or any(f < 0 for f in fractions)
        or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)
    ):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    bounds = [fractions[0], fractions[0] + fractions[1]]
    keys = sorted(set(patient_keys))
    position = {key: _unit_hash(key, seed) for key in keys}
    split = {key: SPLITS[sum(position[key] >= b for b in bounds)] for key in keys}
    priority = [name for name in ("train", "test", "val") if fractions[SPLITS.index(name)] > 0]
    members = [keys] + [sorted(set(g) & set(keys)) for g in (groups or {}).values()]

    def needs(group: list[str]) -> list[str]:
        return priority if len(group) >= 3 else priority[: len(group)]

    def movable(key: str) -> bool:
        here = split[key]
        return all(
            here not in needs(group) or sum(split[k] == here for k in group) > 1
            for group in members
            if key in group
        )

    for group in members:
        for name in needs(group):
            if any(split[k] == name for k in group):
                continue
            index = SPLITS.index(name)
            centre = sum(fractions[:index]) + fractions[index] / 2
            donors = [k for k in group if movable(k)]
            if donors:
                split[min(donors, key=lambda k: abs(position[k] - centre))] = name
    return {key: split[key] for key in patient_keys}
