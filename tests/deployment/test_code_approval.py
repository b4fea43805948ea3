"""Code approval at the site, over real sockets: a SuperLink on loopback (TLS, node authentication), one site
started by ``onfh site``, a tiny app submitted as ``onfh run submit`` stages it. The approved release runs; the
same app with one byte changed is refused before its ClientApp module is imported, and the server hears an error.

The test starts ``flower-superlink`` itself with certificates it makes, so it depends on neither
``onfh provision`` nor ``onfh server``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from client import approval, daemon
from common.deployment import flower_executable, flwr_env, flwr_executable, stop_process_tree
from common.release import stage_app
from tests.deployment.test_end_to_end import _free_port, _wait_for

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
CONNECTION = "gate-test"

CLIENT_APP = '''"""A tiny ClientApp that notes every import of its module, then replies."""
# version 1
import os
from pathlib import Path

with Path({markers!r}).open("a") as markers:
    markers.write(f"imported by pid {{os.getpid()}}\\n")

from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({{"metrics": MetricRecord({{"ok": 1.0}})}}), reply_to=msg)
'''

SERVER_APP = '''"""A tiny ServerApp: one train message to every node; whether each reply has content or an error."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline, nodes = time.monotonic() + 60, []
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids()) or time.sleep(1) or []
    content = RecordDict({{"config": ConfigRecord({{"x": 1}})}})
    replies = grid.send_and_receive(
        [Message(content, dst_node_id=node, message_type="train") for node in nodes], timeout=60
    )
    summary = [
        {{"node": r.metadata.src_node_id, "content": r.has_content(), "error": r.error.reason if r.has_error() else None}}
        for r in replies
    ]
    Path({outputs!r}, f"run-{{context.run_id}}.json").write_text(json.dumps(summary))
'''

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "gatetest"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["gatetest"]

[tool.flwr.app]
publisher = "onfh-tests"

[tool.flwr.app.components]
serverapp = "gatetest.server:app"
clientapp = "gatetest.client:app"

[tool.flwr.app.config]
"""


def _certificate(subject: str, key, issuer_key, issuer: x509.Name | None, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pki(root: Path, address: str) -> tuple[Path, Path]:
    """A CA, the SuperLink's certificate for 127.0.0.1, and a site kit; returns (server folder, kit)."""
    pem = serialization.Encoding.PEM
    server, kit = root / "server", root / "kit"
    server.mkdir()
    kit.mkdir(mode=0o700)
    ca_key, server_key, site_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
    ca = _certificate("gate-test CA", ca_key, ca_key, None, ca=True)
    (server / "server.pem").write_bytes(
        _certificate("127.0.0.1", server_key, ca_key, ca.subject, ca=False).public_bytes(pem)
    )
    (server / "server.key").write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    for folder in (server, kit):
        (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (kit / "site.key").write_bytes(
        site_key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    (kit / "site.key").chmod(0o600)
    ssh = serialization.Encoding.OpenSSH
    (kit / "site.pub").write_bytes(
        site_key.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH)
    )
    (kit / "site.json").write_text(json.dumps({"site-name": "site-a", "server-address": address}))
    return server, kit


def _write_app(folder: Path, markers: Path, outputs: Path) -> Path:
    (folder / "gatetest").mkdir(parents=True)
    (folder / "gatetest" / "__init__.py").write_text('"""Gate test app."""\n')
    (folder / "gatetest" / "client.py").write_text(CLIENT_APP.format(markers=str(markers)))
    (folder / "gatetest" / "server.py").write_text(SERVER_APP.format(outputs=str(outputs)))
    (folder / "pyproject.toml").write_text(PYPROJECT)
    return folder


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[dict]:
    """A SuperLink (TLS + node auth) and one 'onfh site' with the tiny app's release approved."""
    root = tmp_path_factory.mktemp("gate")
    port = _free_port()
    server, kit = _pki(root, f"127.0.0.1:{port}")
    outputs, markers = root / "outputs", root / "imports.txt"
    outputs.mkdir()
    app = _write_app(root / "app", markers, outputs)
    admin_home = root / "admin-home"
    admin_home.mkdir()
    (admin_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{root / "server" / "ca.pem"}"\n'
    )
    started: list[subprocess.Popen] = []
    state = {"root": root, "kit": kit, "app": app, "outputs": outputs, "markers": markers}
    state["flwr"] = lambda *args: subprocess.run(
        [flwr_executable(), *args], env=flwr_env(admin_home), capture_output=True, text=True, timeout=120
    )
    state["superlink_log"], state["site_log"] = root / "superlink.out", root / "site.log"
    try:
        with state["superlink_log"].open("ab") as out:
            started.append(
                subprocess.Popen(
                    [
                        flower_executable("flower-superlink"),
                        "--ssl-certfile",
                        str(server / "server.pem"),
                        "--ssl-keyfile",
                        str(server / "server.key"),
                        "--ssl-ca-certfile",
                        str(server / "ca.pem"),
                        "--enable-supernode-auth",
                        "--disable-runtime-dependency-installation",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ],
                    cwd=root,
                    env=flwr_env(root / "superlink-home"),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )
        _wait_for(
            lambda: state["flwr"]("supernode", "ls", CONNECTION, "--format", "json").returncode == 0,
            60, "the SuperLink", [state["superlink_log"]],
        )  # fmt: skip
        for _ in range(5):  # a SuperLink that has just answered can still drop one call on a loaded machine
            registered = state["flwr"](
                "supernode", "register", str(kit / "site.pub"), CONNECTION, "--name", "site-a"
            )
            if registered.returncode == 0 or "unavailable" not in registered.stdout:
                break
            time.sleep(2)
        assert registered.returncode == 0, registered.stdout + registered.stderr

        # The hospital approves the release it reviewed, then starts its daemon.
        assert (
            daemon.main(["approve", "--kit", str(kit), "--release", str(app), "--note", "tiny app v1"]) == 0
        )
        with (root / "site.out").open("ab") as out:
            started.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "common.cli",
                        "site",
                        "--kit",
                        str(kit),
                        "--data",
                        str(root),
                        "--skip-check",
                        "--cache",
                        str(root / "cache"),
                        "--log",
                        str(state["site_log"]),
                        "--runtime-port",
                        str(_free_port()),
                        "--device",
                        "cpu",
                    ],
                    cwd=PROJECT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )  # fmt: skip
            )

        def online() -> bool:
            done = state["flwr"]("supernode", "ls", CONNECTION, "--format", "json")
            nodes = json.loads(done.stdout[done.stdout.find("{") :] or "{}").get("nodes", [])
            return any(n.get("status") == "online" for n in nodes)

        _wait_for(online, 60, "the site to connect", [state["site_log"], root / "site.out"])
        yield state
    finally:
        for proc in reversed(started):
            stop_process_tree(proc, grace_s=10)


def _submit(state: dict, app: Path) -> tuple[int, dict]:
    """Stage ``app`` as 'onfh run submit' does and run it; returns (run id, the ServerApp's reply summary)."""
    staged = stage_app(app, state["root"] / f"staged-{time.monotonic_ns()}" / "app")
    done = state["flwr"]("run", str(staged), CONNECTION, "--format", "json")
    reply = json.loads(done.stdout[done.stdout.find("{") :])
    assert reply.get("success"), done.stdout + done.stderr
    run_id = int(reply["run-id"])
    result = state["outputs"] / f"run-{run_id}.json"
    logs = [state["site_log"], state["superlink_log"], state["root"] / "site.out"]
    _wait_for(result.is_file, 90, f"run {run_id}'s replies", logs)
    return run_id, {"fab-hash": reply["fab-hash"], "replies": json.loads(result.read_text())}


def _imports(state: dict) -> int:
    return len(state["markers"].read_text().splitlines()) if state["markers"].exists() else 0


def test_the_approved_release_runs_and_one_changed_byte_is_refused(federation):
    approved = approval.approved_digests(approval.approved_file(federation["kit"]))
    v1 = approval.release_digest(federation["app"])
    assert approved == {v1}
    site_out = (federation["root"] / "site.out").read_text()
    assert f"onfh site:   {v1}" in site_out  # the daemon says what it pins

    run_1, result = _submit(federation, federation["app"])
    assert v1.split(":")[1].startswith(result["fab-hash"])  # the bundle 'flwr run' sent is the approved one
    [reply] = result["replies"]
    assert reply["content"] and reply["error"] is None, reply
    assert _imports(federation) >= 1  # the ClientApp module was imported and answered

    client = federation["app"] / "gatetest" / "client.py"
    client.write_text(client.read_text().replace("# version 1", "# version 2"))  # one byte, in a comment
    v2 = approval.release_digest(federation["app"])
    assert v2 != v1
    before = _imports(federation)
    run_2, result = _submit(federation, federation["app"])
    [reply] = result["replies"]
    assert not reply["content"] and "could not be verified" in reply["error"], reply
    assert _imports(federation) == before  # not a line of the changed module ran
    site_log = federation["site_log"].read_text()
    assert f"refused run {run_2}: its bundle {v2} is not an approved release" in site_log
    assert f"onfh site approve --kit {federation['kit'].absolute()} --fab " in site_log
    saved = federation["site_log"].parent / "refused-bundles" / f"{v2.split(':')[1]}.fab"
    assert approval.release_digest(saved) == v2  # kept for review, never installed
    assert f"refused run {run_1}" not in site_log
