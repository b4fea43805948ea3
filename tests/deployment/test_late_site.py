"""A site added with ``onfh provision --add-site`` while ``onfh server`` runs a run: ``onfh server register``
admits its key to the running SuperLink (loopback, TLS, node authentication), it starts ``onfh site`` and
takes part from the next round of the run in progress; the run finishes with all three sites."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import runs
from tests.deployment.kits import hand_back_site, make_federation, site_keygen
from tests.deployment.test_end_to_end import PROJECT, TINY, Processes, _free_port, _online_nodes, _wait_for

pytestmark = pytest.mark.slow

STAGE_ROUNDS = 4  # the site joins during round 2 and takes part from round 3 (later when slow)


def stage_rounds(run_dir: Path) -> list[dict]:
    """The run's staging rounds from ``metrics.jsonl``: round, start and end (Unix time), and the sites
    whose training reply reached the server (the per-round site list)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("phase") != "stage":
            continue
        started = float(entry["started"])
        found.append(
            {
                "round": int(entry["round"]),
                "started": started,
                "ended": started + float(entry.get("seconds", {}).get("round", 0.0)),
                "sites": set(entry.get("bytes", {}).get("train-received", {})),
            }
        )
    return found


def start_site(procs: Processes, root: Path, kits: Path, site: str, data: Path, *extra: str):
    """``onfh site`` for ``site`` (its kit under ``kits/hospitals``), logging under ``root``."""
    return procs.start(
        site,
        "site",
        "--kit", str(kits / "hospitals" / site),
        "--data", str(data),
        "--cache", str(root / "cache" / site),
        "--log", str(root / f"{site}.log"),
        "--runtime-port", str(_free_port()),
        "--preset", str(TINY),
        "--device", "cpu",
        *extra,
    )  # fmt: skip


def start_server(procs: Processes, kits: Path, work: Path, name: str = "server"):
    """``onfh server`` on loopback only; returns once it printed 'ready'."""
    server = procs.start(
        name, "server", "--kit", str(kits / "provision" / "server"), "--host", "127.0.0.1", "--work", str(work)
    )  # fmt: skip
    _wait_for(lambda: "ready" in server[1].read_text(), 180, "the server", [server[1]])
    return server


def onfh(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """One short ``onfh`` command, as an administrator types it."""
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *argv],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_federation) -> Iterator[dict]:
    """A running server with site-00 and site-01 online; site-02 not provisioned yet. (Site-02 reads a copy
    of site-00's export: enough for a hospital that joins late, and no second synthetic federation.)"""
    root = tmp_path_factory.mktemp("late")
    late_data = root / "site-02-export"
    shutil.copytree(tiny_federation / "site-00", late_data)
    kits, work = root / "kits", root / "server-work"
    make_federation(kits, f"127.0.0.1:{_free_port()}", ["site-00", "site-01"])
    procs = Processes(root)
    try:
        server = start_server(procs, kits, work)
        for site in ("site-00", "site-01"):
            start_site(procs, root, kits, site, tiny_federation / site)
        admin = runs.AdminKit(kits / "admins" / "admin")
        logs = [server[1], root / "site-00.out", root / "site-01.out"]
        _wait_for(lambda: _online_nodes(admin) == 2, 240, "both sites to connect", logs)
        yield {"root": root, "kits": kits, "work": work, "procs": procs, "admin": admin, "late": late_data}
    finally:
        procs.stop_all()


def test_site_added_to_a_running_federation_joins_the_run_in_progress(federation):
    root, kits, work, admin = federation["root"], federation["kits"], federation["work"], federation["admin"]
    run_dir = work / "outputs" / "late"
    logs = [root / "server.out", root / "site-02.out", root / "site-02.log"]
    run_id = runs.submit(
        admin, [TINY], [f"run-name='late' min-sites=2 pretrained=false stage-rounds={STAGE_ROUNDS}"]
    )
    _wait_for(lambda: len(stage_rounds(run_dir)) >= 1, 600, "staging round 1", logs)

    # Mid-run: provision the site, register its key with the running server, start the site.
    added_at = time.time()
    public = site_keygen(kits, "site-02") / "site.pub"  # the hospital makes its key; site.pub travels
    done = onfh("provision", "--add-site", f"site-02={public}", str(kits / "provision"))
    assert done.returncode == 0, done.stderr
    hand_back_site(kits, "site-02")  # ca.pem and site.json go back, beside site.key
    assert "onfh server register" in done.stdout
    assert (kits / "provision" / "server" / "site-keys" / "site-02.pub").is_file()
    done = onfh(
        "server", "register", "--kit", str(kits / "provision" / "server"), "--host", "127.0.0.1", "--work", str(work)
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    registered = re.search(r"site site-02: registered \(node (\d+)\)", done.stdout)
    assert registered, done.stdout
    assert "site site-00: already registered" in done.stdout
    late, _ = start_site(federation["procs"], root, kits, "site-02", federation["late"])
    _wait_for(lambda: _online_nodes(admin) == 3, 180, "site-02 to connect", logs)
    online_at = time.time()

    entry = runs.wait_finished(admin, run_id, timeout_s=900)  # minutes when the CPUs are shared
    assert entry["status"] == "finished:completed", runs.logs(admin, run_id)[-3000:]
    rounds = stage_rounds(run_dir)
    assert [r["round"] for r in rounds] == list(range(1, STAGE_ROUNDS + 1))
    # The late site's label: its name, or node-ID where the server names sites from the inventory
    # query at the run's start only (the node id is the one 'onfh server register' printed).
    late_labels = {"site-02", f"node-{registered.group(1)}"}
    first_two = {"site-00", "site-01"}
    before = [r for r in rounds if r["started"] < added_at]
    after = [r for r in rounds if r["started"] > online_at]
    assert before and all(r["sites"] == first_two for r in before), rounds
    # Every round that began once site-02 was online had it: it takes part from the next round on.
    assert after, (rounds, online_at)
    for r in after:
        assert first_two < r["sites"] and len(r["sites"] & late_labels) == 1 and len(r["sites"]) == 3, r
    first = min(r["round"] for r in rounds if r["sites"] & late_labels)
    assert all(r["sites"] & late_labels for r in rounds if r["round"] >= first)

    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["history"]["inventory"]) == first_two  # asked at the run's start
    # Joining is nobody's failure: nothing rejected or excluded (a late node may be flagged or capped).
    assert not [f for f in results["failures"] if f.get("action", "rejected") in ("rejected", "excluded")]
    assert late.poll() is None  # the late site is still connected, waiting for the next run
