"""``onfh check DATA_DIR``: a data report a hospital can act on.

Reads the site's DICOM export and labels (never writes them), builds the preprocessed cache,
and prints: studies, protocols found and missing (with the patients missing each), labelled and
unlabelled hips per stage, MR-CT pairs, localisation confidence, and every problem with its
file and the fix. Exits 1 only when nothing usable is found (or the folder cannot be read).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from common.files import user_cache_dir
from common.problems import SEVERITIES
from common.sitedata.load import LOW_CONFIDENCE, SiteData, load_site
from common.sitedata.settings import PreprocessSettings

STAGE_NAMES: dict[int, str] = {1: "I", 2: "II", 3: "III", 4: "IV"}
MAX_LISTED = 8  # folders listed per line before "and N more"

EXIT_OK = 0
EXIT_NOTHING_USABLE = 1
EXIT_CANNOT_CHECK = 2


def _listing(places: list[str]) -> str:
    shown = ", ".join(places[:MAX_LISTED])
    return shown + (f", and {len(places) - MAX_LISTED} more" if len(places) > MAX_LISTED else "")


def report(site: SiteData, verbose: bool = False) -> str:
    """The human-readable report of a loaded site (one string, lines separated by newlines).

    Args:
        site: a site loaded by ``load_site``.
        verbose: also list notes (ignored files, unknown series), not only their count.
    """
    s = site.stats
    n_hips = len(site.stages)
    lines = [f"Site {site.name}", ""]
    lines.append(
        f"  files                     {s.get('files', 0)} ({s.get('dicom_files', 0)} DICOM, "
        f"{s.get('ignored_files', 0)} not used)"
    )
    lines.append(f"  patients                  {s.get('patients', 0)} ({s.get('studies', 0)} studies)")

    lines += ["", "  protocol     patients with it   missing   hips with it"]
    for i, protocol in enumerate(site.protocols):
        have_patients = s.get("protocol_patients", {}).get(protocol, 0)
        missing = s.get("patients", 0) - have_patients
        have_hips = int(site.available[:, i].sum()) if n_hips else 0
        lines.append(f"  {protocol:<12} {have_patients:>16}   {missing:>7}   {have_hips:>12}")
    for protocol in site.protocols:
        lacking = [p.folder for p in site.patients if protocol not in p.protocols]
        if lacking and len(lacking) < len(site.patients):
            lines.append(f"    missing {protocol}: {_listing(lacking)}")
        elif lacking:
            lines.append(f"    missing {protocol}: every patient (masked in training, not an error)")

    labelled = int((site.stages > 0).sum())
    per_stage = ", ".join(f"{STAGE_NAMES[st]}: {int((site.stages == st).sum())}" for st in STAGE_NAMES)
    healthy = int(site.healthy.sum()) if len(site.healthy) == n_hips else 0
    lines += [""]
    lines.append(f"  hips found                {n_hips}")
    lines.append(f"  labelled hips (ARCO)      {labelled} ({per_stage})")
    lines.append(f"  healthy hips (stage 0)    {healthy} (pretraining only, not in the four-way task)")
    lines.append(f"  unlabelled hips           {n_hips - labelled - healthy} (pretraining only)")
    lines.append(
        f"  CT                        {s.get('patients_with_ct', 0)} patients with CT, "
        f"{s.get('patients_with_ct_pairs', 0)} paired: {len(site.pairs_mr)} MR-CT slice pairs"
    )
    unpaired = [p.folder for p in site.patients if p.has_ct and p.pairs == 0]
    if unpaired:
        lines.append(f"    CT not paired: {_listing(unpaired)} (see the problems below)")
    if n_hips:
        low = np.flatnonzero(site.confidence < LOW_CONFIDENCE)
        lines.append(
            f"  localisation confidence   median {np.median(site.confidence):.2f}, "
            f"min {site.confidence.min():.2f}; {len(low)} hips below {LOW_CONFIDENCE}"
        )
        if len(low):
            folder_of = {p.key: p.folder for p in site.patients}
            places = [f"{folder_of.get(str(site.patient_keys[i]), '?')} ({site.sides[i]})" for i in low]
            lines.append(
                f"    check: {_listing(places)} -> look at the crop, or give the centre in labels.csv "
                "(fh_x_mm, fh_y_mm, fh_z_mm)"
            )

    splits = {name: sum(1 for v in site.split.values() if v == name) for name in ("train", "val", "test")}
    lines += [""]
    lines.append(
        f"  split by patient          train {splits['train']}, val {splits['val']}, test {splits['test']}"
    )

    counts = site.problems.counts()
    lines += [
        "",
        f"  problems: {counts['error']} errors, {counts['warning']} warnings, {counts['info']} notes",
    ]
    for line in site.problems.lines("info" if verbose else "warning"):
        lines.append("    " + line)
    if not verbose and counts["info"]:
        lines.append(f"    ({counts['info']} notes hidden: ignored files, unknown series; use --verbose)")
    return "\n".join(lines)


def summary_json(site: SiteData) -> dict:
    """Counts and problems of a site as JSON-ready data (no images; problem paths name site files, keep it local)."""
    return {
        "site": site.name,
        "stats": site.stats,
        "problems": {
            severity: [
                {"path": p.path, "reason": p.reason, "fix": p.fix}
                for p in site.problems.with_severity(severity)
            ]
            for severity in SEVERITIES
        },
    }


def default_check_cache(data_dir: Path) -> Path:
    """This user's cache for checking ``data_dir`` (one per export folder), mode 0700."""
    where = data_dir.absolute()
    return user_cache_dir("check", f"{where.name}-{hashlib.sha256(str(where).encode()).hexdigest()[:8]}")


def main(argv: list[str] | None = None) -> int:
    """``onfh check DATA_DIR [--cache-dir DIR] [--workers N] [--verbose] [--json FILE]``.

    Returns:
        0 when at least one hip is usable, 1 when nothing usable is found or the folder cannot
        be read, 2 when the check itself cannot run (cache folder not writable, internal error).
    """
    parser = argparse.ArgumentParser(prog="onfh check", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help="the site's folder: DICOM export + labels.csv")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where preprocessed hips are kept (default: ~/.cache/onfh/check/NAME-HASH, never beside DATA_DIR)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes for preprocessing (default 2)")
    parser.add_argument(
        "--verbose", action="store_true", help="also list notes (ignored files, unknown series)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the counts and problems as JSON")
    args = parser.parse_args(argv)
    data_dir = args.data_dir
    if not data_dir.is_dir():
        what = "is not a folder" if data_dir.exists() else "does not exist"
        print(f"onfh check: {data_dir} {what}: pass the folder holding the DICOM export", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    cache = args.cache_dir or default_check_cache(data_dir)
    try:
        site = load_site(
            data_dir,
            cache,
            PreprocessSettings(),
            workers=max(1, args.workers),
            progress=lambda message: print(message, file=sys.stderr),
        )
    except ValueError as exc:
        print(f"onfh check: {exc}", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    except OSError as exc:
        print(
            f"onfh check: cannot write the cache in {cache} ({type(exc).__name__}: {exc.strerror or exc}); "
            "pass --cache-dir with a writable folder",
            file=sys.stderr,
        )
        return EXIT_CANNOT_CHECK
    except Exception as exc:  # noqa: BLE001 - a traceback is never what a hospital should see
        print(
            f"onfh check: internal error ({type(exc).__name__}: {exc}); please report this line "
            "to the onfh maintainers",
            file=sys.stderr,
        )
        return EXIT_CANNOT_CHECK
    print(report(site, args.verbose))
    if args.json:
        try:
            args.json.write_text(json.dumps(summary_json(site), indent=2))
        except OSError as exc:
            print(f"onfh check: cannot write {args.json} ({exc.strerror or exc})", file=sys.stderr)
    if len(site.stages) == 0:
        print(
            "\nNothing usable: no femoral head could be cropped from this folder; fix the problems "
            "above (a coronal T1 series per patient is the minimum)."
        )
        return EXIT_NOTHING_USABLE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
