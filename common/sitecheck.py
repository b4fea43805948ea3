"""``onfh check DATA_DIR``: a data report a hospital can act on.

Reads the site's DICOM export and labels (never writes them), builds the preprocessed cache,
and prints: patients, hips per protocol and missing protocols, labelled and unlabelled hips,
MR-CT pairs, localisation confidence, and every problem with its file and the fix.
Exits 1 only when nothing usable is found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common.settings import STAGES, PreprocessSettings
from common.site_data import SiteData, load_site


def report(site: SiteData, verbose: bool = False) -> str:
    """The human-readable report of a loaded site."""
    s = site.stats
    lines = [f"Site {site.name}", ""]
    lines.append(f"  patients (studies)        {s.get('patients', 0)}")
    lines.append(f"  hips found                {len(site.stages)}")
    labelled = site.stages > 0
    by_stage = ", ".join(
        f"{'I II III IV'.split()[i]}: {int((site.stages == st).sum())}" for i, st in enumerate(STAGES)
    )
    lines.append(f"  labelled hips             {int(labelled.sum())} ({by_stage})")
    lines.append(f"  unlabelled hips           {int((~labelled).sum())} (used for pretraining only)")
    lines.append(
        f"  MR-CT slice pairs         {len(site.pairs_mr)} from {s.get('patients_with_ct_pairs', 0)} patients"
    )
    if len(site.confidence):
        low = int((site.confidence < 0.5).sum())
        lines.append(
            f"  localisation confidence   median {np.median(site.confidence):.2f}, min {site.confidence.min():.2f}, "
            f"{low} hips below 0.5 (check them or give centres in labels.csv)"
        )
    lines.append("")
    lines.append("  protocol     hips with it   hips missing it")
    for i, protocol in enumerate(site.protocols):
        have = int(site.available[:, i].sum()) if len(site.available) else 0
        lines.append(f"  {protocol:<12} {have:>12}   {len(site.stages) - have:>15}")
    splits = {name: sum(1 for v in site.split.values() if v == name) for name in ("train", "val", "test")}
    lines.append("")
    lines.append(
        f"  split by patient          train {splits['train']}, val {splits['val']}, test {splits['test']}"
    )
    counts = site.problems.counts()
    lines.append("")
    lines.append(
        f"  problems: {counts['error']} errors, {counts['warning']} warnings, {counts['info']} notes"
    )
    for line in site.problems.lines("info" if verbose else "warning"):
        lines.append("    " + line)
    if not verbose and counts["info"]:
        lines.append(
            f"    ({counts['info']} notes hidden, e.g. non-DICOM files and unknown series: use --verbose)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onfh check", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help="the site's folder: DICOM export + labels.csv")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a folder beside DATA_DIR")
    parser.add_argument("--workers", type=int, default=2, help="processes for preprocessing")
    parser.add_argument(
        "--verbose", action="store_true", help="also list notes (ignored files, unknown series)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the counts and problems as JSON")
    args = parser.parse_args(argv)
    cache = args.cache_dir or args.data_dir.parent / f".{args.data_dir.name}-cache"
    try:
        site = load_site(
            args.data_dir,
            cache,
            PreprocessSettings(),
            workers=args.workers,
            progress=lambda m: print(m, file=sys.stderr),
        )
    except ValueError as exc:
        print(f"onfh check: {exc}", file=sys.stderr)
        return 1
    print(report(site, args.verbose))
    if args.json:
        args.json.write_text(
            json.dumps({"stats": site.stats, "problems": [p.__dict__ for p in site.problems]}, indent=2)
        )
    if len(site.stages) == 0:
        print("\nNothing usable: no femoral head could be cropped from this folder (see the problems above).")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
