"""Attacks on ``onfh server`` over real sockets: what an outsider, a revoked site and an admin can do.

The server is started as a hospital IT team starts it (``onfh server --kit KIT``; only ``--host
127.0.0.1`` is added, because a test listens on loopback only). The outsider holds what every
hospital holds, the CA certificate and the address the sites dial, and uses Flower's own ``flwr``
CLI and plain HTTPS; the admin uses the admin kit (``onfh run``).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.deployment import flower_executable, flwr_env, stop_process_tree
from common.keys import generate_site_key
from server import runs
from server.runs import CONNECTION, write_flwr_connection
from tests.deployment.kits import make_federation
from tests.deployment.test_end_to_end import Processes, _free_port, _wait_for

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("front")
    port, admin_port = _free_port(), _free_port()
    kits = make_federation(root / "kits", f"127.0.0.1:{port}", ["site-00", "site-01"], admin_port=admin_port)
    procs = Processes(root)
    work = kits["server"] / "work"
    proc, log = procs.start("server", "server", "--kit", str(kits["server"]), "--host", "127.0.0.1")
    try:
        _wait_for(lambda: "ready" in log.read_text(), 120, "onfh server ready", [log])
        yield {"root": root, "kits": kits, "port": port, "admin_port": admin_port, "work": work, "log": log}
    finally:
        procs.stop_all()


def _outsider(root: Path, address: str) -> Path:
    """A fresh Flower config holding only the CA certificate, pointed at ``address``."""
    home = root / f"outsider-{address.rsplit(':', 1)[1]}"
    write_flwr_connection(home, address, root / "kits" / "provision" / "ca" / "ca.pem")
    return home


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *args],
        env=flwr_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _succeeded(done: subprocess.CompletedProcess) -> bool:
    return done.returncode == 0 and '"success": false' not in done.stdout


def _attempts(home: Path, app: Path, key: Path) -> dict[str, subprocess.CompletedProcess]:
    """The five Control API acts, each as Flower's CLI does it."""
    return {
        "list runs": _flwr(home, "ls", CONNECTION, "--format", "json"),
        "register a node key": _flwr(home, "supernode", "register", str(key), CONNECTION, "--format", "json"),
        "submit a run": _flwr(home, "run", str(app), CONNECTION, "--format", "json"),
        "read logs": _flwr(home, "log", "1", CONNECTION, "--show"),
        "stop a run": _flwr(home, "stop", "1", CONNECTION, "--format", "json"),
    }


def _claim_runtime_task(port: int, ca: Path) -> int | str:
    """Try to claim a ServerApp task on the Runtime API through ``port``: the HTTP status, or the TLS error."""
    try:
        reply = httpx.post(
            f"https://127.0.0.1:{port}/v1/runtime/acquire-task",
            content=b"",
            headers={"content-type": "application/protobuf"},
            verify=ssl.create_default_context(cafile=str(ca)),
            timeout=10,
        )
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return reply.status_code


def test_outsider_with_the_ca_certificate_is_refused_six_of_six(server, tmp_path) -> None:
    """Every Control and Runtime act fails on both doors for a party without an admin certificate."""
    ca = server["kits"]["provision"] / "ca" / "ca.pem"
    app = runs.stage_app(PROJECT, tmp_path / "app")
    key = generate_site_key(tmp_path / "intruder", "intruder").parent / "site.pub"
    for port in (server["port"], server["admin_port"]):
        home = _outsider(server["root"], f"127.0.0.1:{port}")
        done = _attempts(home, app, key)
        allowed = [act for act, result in done.items() if _succeeded(result)]
        assert not allowed, f"door {port}: an outsider could {allowed}"
        claim = _claim_runtime_task(port, ca)
        assert claim == 403 or isinstance(claim, str), f"door {port}: runtime claim answered {claim}"
        assert len(done) + 1 == 6
    audit = [json.loads(line) for line in (server["work"] / "audit.jsonl").read_text().splitlines()]
    refused = [a for a in audit if a.get("status") == 403 and a["door"] == "site"]
    assert any(a["path"].startswith("/v1/control/") for a in refused)
    assert any(a["path"] == "/v1/runtime/acquire-task" for a in refused)
    # The SuperLink itself listens on loopback only: the site door is the front, not the SuperLink.
    upstream = json.loads((server["work"] / "superlink.json").read_text())["port"]
    assert _listening_on(upstream) == {"127.0.0.1"}


def _listening_on(port: int) -> set[str]:
    """Local addresses with a TCP listener on ``port`` (Linux /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_admin_kit_does_each_control_act(server, tmp_path) -> None:
    """Through its certificate, the admin lists runs, registers a key, submits, reads logs and stops."""
    kit = runs.AdminKit(server["kits"]["admin"])
    assert runs.runs(kit) == []
    key = generate_site_key(tmp_path / "spare", "spare").parent / "site.pub"
    registered = kit.flwr("supernode", "register", str(key), CONNECTION, "--format", "json")
    assert _succeeded(registered), registered.stdout + registered.stderr
    run_id = runs.submit(kit, [PROJECT / "presets" / "tiny.toml"], ["run-name='front-admin'"])
    assert [int(r["run-id"]) for r in runs.runs(kit)] == [run_id]
    shown = kit.flwr("log", str(run_id), CONNECTION, "--show")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert runs.main(["stop", "--kit", str(server["kits"]["admin"]), str(run_id)]) == 0
    _wait_for(lambda: runs.runs(kit, run_id)[0]["status"].startswith("finished"), 60, "the run to stop")
    audit = [json.loads(line) for line in (server["work"] / "audit.jsonl").read_text().splitlines()]
    by_admin = {a["path"] for a in audit if a["door"] == "admin" and a["who"] == "admin"}
    assert {"/v1/control/start-run", "/v1/control/stop-run", "/v1/control/register-node"} <= by_admin


def _supernode(kit: Path, port: int, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                flower_executable("flower-supernode"),
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-certificates",
                str(kit / "ca.pem"),
                "--auth-supernode-private-key",
                str(kit / "site.key"),
                "--port",
                str(_free_port()),
            ],  # fmt: skip
            env=flwr_env(log.parent / f"{log.stem}-home"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _joins(kit: Path, port: int, log: Path, within_s: float = 25.0) -> bool:
    """Whether a SuperNode with ``kit``'s key gets a node ID from the server within ``within_s``."""
    proc = _supernode(kit, port, log)
    try:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline and proc.poll() is None:
            if "SuperNode ID" in log.read_text():
                return True
            time.sleep(0.5)
        return "SuperNode ID" in log.read_text()
    finally:
        stop_process_tree(proc, grace_s=5)


def test_revoked_site_cannot_rejoin(server, tmp_path) -> None:
    """After ``onfh server revoke``: refused under its old key and under a new key it registers itself."""
    site_kit, port = server["kits"]["sites"]["site-01"], server["port"]
    assert _joins(site_kit, port, tmp_path / "before.log"), (tmp_path / "before.log").read_text()[-2000:]
    kit = str(server["kits"]["server"])
    revoked = subprocess.run(
        [sys.executable, "-m", "common.cli", "server", "revoke", "site-01", "--kit", kit],
        cwd=PROJECT, capture_output=True, text=True, timeout=120, env={**os.environ},
    )  # fmt: skip
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert not _joins(site_kit, port, tmp_path / "old-key.log")
    # The site makes a new key and registers it itself, with what it has: the CA and the site door.
    new = tmp_path / "new-kit"
    generate_site_key(new, "site-01")
    for name in ("ca.pem", "site.json"):
        (new / name).write_bytes((site_kit / name).read_bytes())
    home = _outsider(tmp_path, f"127.0.0.1:{port}")
    done = _flwr(home, "supernode", "register", str(new / "site.pub"), CONNECTION, "--format", "json")
    assert not _succeeded(done)
    assert not _joins(new, port, tmp_path / "new-key.log")
    # And the central host's own 'register' refuses the revoked name even if its key comes back.
    (server["kits"]["server"] / "site-keys" / "site-01.pub").write_bytes((new / "site.pub").read_bytes())
    again = subprocess.run(
        [sys.executable, "-m", "common.cli", "server", "register", "--kit", kit],
        cwd=PROJECT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode != 0 and "revoked" in again.stderr
    (server["kits"]["server"] / "site-keys" / "site-01.pub").unlink()
    actions = [
        json.loads(line).get("action") for line in (server["work"] / "audit.jsonl").read_text().splitlines()
    ]
    assert "revoke" in actions
