"""``onfh site audit``: what this site has sent, read from its egress ledger (``client.ledger``).

    onfh site audit --kit DIR [--cache DIR]     # the ledger onfh site keeps beside its cache
    onfh site audit --ledger FILE [--kit DIR]   # any ledger file; --kit names the server
    ... --json                                  # the summary as JSON

Prints messages per run, phase and kind with the tensor bytes they carried, their first and
last time (UTC), every metric key and config key ever sent, how many evaluations were withheld
and how many error replies were sent, and the server they went to (the kit's
``server-address``; a ledger alone does not know it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from client import ledger
from common.files import user_cache_dir

EXIT_OK = 0
EXIT_BAD_ARGS = 2


def summarise(entries: Iterable[dict], server: str | None = None) -> dict:
    """The audit summary of ledger lines (:func:`client.ledger.read`).

    Returns ``messages``, ``first``/``last`` (ISO times, None when empty), ``sites``, ``server``,
    ``array-bytes`` (tensor bytes of all arrays sent), ``rows`` (one per run, phase and kind:
    ``run-id``, ``phase``, ``kind``, ``messages``, ``masked``, ``array-bytes``, ``first``, ``last``),
    ``metric-keys``, ``config-keys``, ``withheld`` (evaluations withheld by the release bound),
    ``errors`` (error replies) and ``masked`` (messages sent under secure aggregation).
    """
    entries = list(entries)
    rows: dict[tuple, dict] = {}
    metric_keys: set[str] = set()
    config_keys: set[str] = set()
    for entry in entries:
        key = (entry.get("run-id"), str(entry.get("phase")), str(entry.get("kind")))
        row = rows.setdefault(
            key,
            {"run-id": key[0], "phase": key[1], "kind": key[2], "messages": 0, "masked": 0, "array-bytes": 0},
        )
        row["messages"] += 1
        row["masked"] += int(bool(entry.get("masked")))
        row["array-bytes"] += int(entry.get("array-bytes", 0))
        row["first"] = min(row.get("first", entry["time"]), entry["time"])
        row["last"] = max(row.get("last", entry["time"]), entry["time"])
        metric_keys.update(entry.get("metrics", {}))
        config_keys.update(entry.get("config", {}))
    times = [e["time"] for e in entries]
    return {
        "messages": len(entries),
        "first": min(times) if times else None,
        "last": max(times) if times else None,
        "sites": sorted({str(e.get("site")) for e in entries}),
        "server": server,
        "array-bytes": sum(r["array-bytes"] for r in rows.values()),
        "rows": sorted(rows.values(), key=lambda r: (str(r["run-id"]), r["first"], r["phase"], r["kind"])),
        "metric-keys": sorted(metric_keys),
        "config-keys": sorted(config_keys),
        "withheld": sum(1 for e in entries if e.get("metrics", {}).get("withheld")),
        "errors": sum(1 for e in entries if e.get("kind") == "error"),
        "masked": sum(1 for e in entries if e.get("masked")),
    }


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(summary: dict, source: Path | str) -> str:
    """The summary as plain text: a header, a table, the keys."""
    lines = [
        f"egress ledger {source}",
        f"site(s): {', '.join(summary['sites']) or '-'}   server: {summary['server'] or 'unknown (pass --kit)'}",
        f"messages: {summary['messages']}, first {summary['first'] or '-'}, last {summary['last'] or '-'}",
        f"tensor bytes sent: {_bytes(summary['array-bytes'])}; evaluations withheld: {summary['withheld']}; "
        f"error replies: {summary['errors']}; masked (secure aggregation): {summary['masked']}",
        "",
    ]
    header = ["run", "phase", "kind", "messages", "masked", "tensor bytes", "first (UTC)", "last (UTC)"]
    table = [header] + [
        [
            str(r["run-id"]),
            r["phase"],
            r["kind"],
            str(r["messages"]),
            str(r.get("masked", 0)),
            _bytes(r["array-bytes"]),
            r["first"][:19],
            r["last"][:19],
        ]
        for r in summary["rows"]
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    lines += [
        "",
        f"metric keys sent: {', '.join(summary['metric-keys']) or '-'}",
        f"config keys sent: {', '.join(summary['config-keys']) or '-'}",
    ]
    return "\n".join(lines)


def _kit_settings(kit: Path) -> dict:
    """The kit's ``site.json`` (site-name, server-address), or ValueError naming the file."""
    path = kit / "site.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path} cannot be read ({exc}): pass the site's kit folder, or --ledger FILE"
        ) from None


def locate(ledger_file: Path | None, kit: Path | None, cache: Path | None) -> tuple[Path, str | None]:
    """The ledger to read and the server it went to (None when no kit is given); ValueError otherwise."""
    settings = _kit_settings(kit) if kit is not None else {}
    server = settings.get("server-address")
    if ledger_file is None:
        if kit is None:
            raise ValueError("pass --kit DIR (the ledger onfh site keeps) or --ledger FILE")
        name = str(settings["site-name"])
        ledger_file = ledger.default_ledger_path(cache or user_cache_dir(name) / "cache", name)
    if not ledger_file.is_file():
        raise ValueError(
            f"no egress ledger at {ledger_file}: this site has sent nothing yet, or its ledger is elsewhere "
            "(node config ledger-file; pass --ledger FILE, or --cache DIR as given to onfh site)"
        )
    return ledger_file, server


def main(argv: list[str]) -> int:
    """``onfh site audit ...``; 0, or 2 when the ledger cannot be found or read."""
    parser = argparse.ArgumentParser(
        prog="onfh site audit",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ledger", type=Path, default=None, help="the egress ledger file")
    parser.add_argument("--kit", type=Path, default=None, help="the site's kit folder (site.json)")
    parser.add_argument("--cache", type=Path, default=None, help="the --cache given to onfh site, if any")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        path, server = locate(args.ledger, args.kit, args.cache)
        summary = summarise(ledger.read(path), server)
    except ValueError as exc:
        print(f"onfh site audit: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    print(json.dumps({"ledger": str(path), **summary}, indent=2) if args.json else render(summary, path))
    return EXIT_OK
