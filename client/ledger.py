"""The site's egress ledger: one JSON line per message the site sends, in a local append-only file.

The ClientApp writes a line for every reply it builds (``client.client_app._reply``) and for every
error it raises (``client.client_app._guarded``: Flower sends the error's text as the reply), before
the reply leaves: a line that cannot be written stops a reply with content (the task fails instead).
A line holds what was sent, value by value, except the weights themselves::

    {"time": "2026-01-31T09:15:02.123456+00:00", "site": "hospital-a", "run-id": 42,
     "kind": "evaluate", "phase": "stage", "round": 3, "split": "val",
     "arrays": [], "array-bytes": 0, "metrics": {"num-examples": 0, "withheld": 1, ...},
     "config": {"site-name": "hospital-a"}, "error": null, "masked": false}

``kind`` is ``query`` (the inventory), ``train``, ``evaluate`` or ``error`` (then ``task`` names the
request it answers and ``error`` holds the text sent); ``arrays`` lists each array's name, shape,
dtype and bytes; ``masked`` is true where the arrays are a secure-aggregation masked vector
(:mod:`client.secagg`: the server can only sum it with the other sites'). Key material the
secure aggregation sends (public keys, shares encrypted for other sites) is written as its size,
e.g. ``"<215 bytes>"``.

The file is the node config's ``ledger-file``, else ``SITE.egress-ledger.jsonl`` beside the
site's cache folder (``onfh site``: ``~/.cache/onfh/SITE/SITE.egress-ledger.jsonl``), so that
clearing the cache keeps it. It is opened with ``O_APPEND`` (each line one write) and mode 0600.
``onfh site audit`` (:mod:`client.audit`) summarises it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message

LEDGER_KEY = "ledger-file"  # node config key
KINDS = ("query", "train", "evaluate", "error")


def default_ledger_path(cache_dir: Path | str, site_name: str) -> Path:
    """``SITE.egress-ledger.jsonl`` beside the site's cache folder (the site name's plain characters)."""
    name = re.sub(r"[^\w.-]", "_", site_name).lstrip(".") or "site"
    return Path(cache_dir).absolute().parent / f"{name}.egress-ledger.jsonl"


def ledger_path(node_config: Mapping[str, Any], cache_dir: Path | str, site_name: str) -> Path:
    """The ledger of a site: node config ``ledger-file`` if set, else :func:`default_ledger_path`."""
    value = node_config.get(LEDGER_KEY)
    return Path(str(value)) if value else default_ledger_path(cache_dir, site_name)


def append(path: Path, entry: Mapping[str, Any]) -> None:
    """Append one JSON line to the ledger at ``path`` (created 0600 with its folder if missing).

    One ``write`` of the whole line on an ``O_APPEND`` descriptor: lines of concurrent writers do
    not interleave, and nothing already written is ever rewritten.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=False, allow_nan=True, default=_plain) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        written = os.write(fd, line)
        while written < len(line):  # a short write: the rest follows (never observed on local disks)
            written += os.write(fd, line[written:])
    finally:
        os.close(fd)


def read(path: Path) -> list[dict]:
    """Every line of a ledger, in order.

    Raises:
        ValueError: a line that is not JSON (its number and the file named).
    """
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"egress ledger {path}: line {number} is not JSON ({exc.msg})") from None
    return entries


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _request_fields(request: Message) -> dict[str, Any]:
    """Run, phase, round and split of the request a message answers (what its config says)."""
    config: Mapping[str, Any] = {}
    if request.has_content() and "config" in request.content.config_records:
        config = request.content.config_records["config"]
    phase = config.get("phase", config.get("query", request.metadata.message_type))
    group = request.metadata.group_id
    round_no = config.get("phase-round", int(group) if str(group).isdigit() else None)
    fields: dict[str, Any] = {"run-id": int(request.metadata.run_id), "phase": str(phase), "round": round_no}
    if "split" in config:
        fields["split"] = str(config["split"])
    return fields


def _shown(value: Any) -> Any:
    """A config value as the ledger writes it: bytes (keys, ciphertexts) by their size, lists item by item."""
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, list):
        return [_shown(v) for v in value]
    return value


def _now() -> str:
    return datetime.now(UTC).isoformat()


def reply_entry(request: Message, reply: Message, site: str, masked: bool = False) -> dict[str, Any]:
    """The ledger line of ``reply`` (a reply with content) to ``request`` from ``site``; ``masked``:
    its arrays are a secure-aggregation masked vector."""
    content = reply.content
    arrays = [
        {
            "name": name,
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "bytes": int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize,
        }
        for record in content.array_records.values()
        for name, array in record.items()
    ]
    metrics = {k: v for record in content.metric_records.values() for k, v in record.items()}
    config = {k: v for record in content.config_records.values() for k, v in record.items()}
    return {
        "time": _now(),
        "site": site,
        **_request_fields(request),
        "kind": str(request.metadata.message_type),
        "arrays": arrays,
        "array-bytes": sum(a["bytes"] for a in arrays),
        "metrics": {k: (list(v) if isinstance(v, list) else v) for k, v in metrics.items()},
        "config": {k: _shown(list(v) if isinstance(v, list) else v) for k, v in config.items()},
        "error": None,
        "masked": bool(masked),
    }


def error_entry(request: Message, reason: str, site: str) -> dict[str, Any]:
    """The ledger line of the error reply (text ``reason``) ``site`` sends to ``request``."""
    return {
        "time": _now(),
        "site": site,
        **_request_fields(request),
        "kind": "error",
        "task": str(request.metadata.message_type),
        "arrays": [],
        "array-bytes": 0,
        "metrics": {},
        "config": {},
        "error": reason,
        "masked": False,
    }
