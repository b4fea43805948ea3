"""A SuperLink and two SuperNodes started by ``onfh server`` / ``onfh site`` over loopback TLS with node
authentication; a tiny two-phase run submitted with the admin kit, the server restarted mid-run, the run
resumed from its checkpoint; refusals by the live server; no private key in anything written."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.deployment import stop_process_tree
from server import runs
from tests.deployment.kits import add_site, make_federation

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
TINY = PROJECT / "presets" / "tiny.toml"


def _free_port() -> int:
    """A free loopback port whose next port is free too (a server's admin door is its site port + 1),
    drawn below the kernel's ephemeral range: a port the kernel hands out (bind to 0) can be taken
    by any outgoing connection before the process that is meant to listen on it starts."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low, high = (20000, ephemeral - 1) if ephemeral > 21000 else (1024, 65000)  # the latter: odd kernels
    draw = random.SystemRandom()
    for _ in range(100):
        port = draw.randrange(low, high)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no two free neighbouring loopback ports in {low}-{high}")


class Processes:
    """Every process a test starts, stopped by the test (finalizer), its whole tree included."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, *argv: str) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.out"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "common.cli", *argv],
                cwd=PROJECT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.started.append((proc, log))
        return proc, log

    def stop_all(self) -> None:
        for proc, _ in reversed(self.started):
            stop_process_tree(proc, grace_s=20)
        # Anything orphaned (its parent killed) still names this test's folder on its command line.
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if str(self.root).encode() in cmdline:
                    try:
                        os.kill(int(entry.name), signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def _wait_for(predicate, timeout_s: float, what: str, logs: list[Path] = ()) -> None:
    """Poll ``predicate`` until true; the interval grows from 1 s to 5 s, since a predicate that runs the
    ``flwr`` CLI costs seconds of CPU the federation under test needs."""
    deadline, interval = time.monotonic() + timeout_s, 1.0
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")
        time.sleep(interval)
        interval = min(interval * 1.5, 5.0)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_federation) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("deploy")
    port = _free_port()
    kits = root / "kits"
    make_federation(kits, f"127.0.0.1:{port}", ["site-00", "site-01"])
    procs = Processes(root)
    work = root / "server-work"
    state = {"root": root, "kits": kits, "port": port, "work": work, "procs": procs, "sites": {}}
    try:
        state["server"] = procs.start(
            "server", "server", "--kit", str(kits / "provision" / "server"), "--host", "127.0.0.1", "--work", str(work)
        )  # fmt: skip
        for site in ("site-00", "site-01"):
            state["sites"][site] = procs.start(
                site,
                "site",
                "--kit", str(kits / "hospitals" / site),
                "--data", str(tiny_federation / site),
                "--cache", str(root / "cache" / site),
                "--log", str(root / f"{site}.log"),
                "--runtime-port", str(_free_port()),
                "--preset", str(TINY),
                "--device", "cpu",
            )  # fmt: skip
        server_log = state["server"][1]
        _wait_for(lambda: "ready" in server_log.read_text(), 180, "the server", [server_log])
        yield state
    finally:
        procs.stop_all()


def _admin(state) -> runs.AdminKit:
    return runs.AdminKit(state["kits"] / "admins" / "admin")


def _online_nodes(admin: runs.AdminKit) -> int:
    done = admin.flwr("supernode", "ls", runs.CONNECTION, "--format", "json")
    if done.returncode != 0:
        return 0
    reply = json.loads(done.stdout[done.stdout.find("{") :])
    return sum(1 for node in reply.get("nodes", []) if node.get("status") == "online")


@pytest.fixture(scope="module")
def finished_run(deployment) -> dict:
    """Submit, stop the server after phase 1, restart it, resume the run to its end."""
    admin = _admin(deployment)
    run_dir = deployment["work"] / "outputs" / "deploy"
    logs = [deployment["server"][1], deployment["root"] / "site-00.log", deployment["root"] / "site-00.out"]
    first = runs.submit(admin, [TINY], ["run-name='deploy' min-sites=2"])

    # Server restart mid-run: after phase 1's checkpoint, before phase 2.
    _wait_for(lambda: (run_dir / "pretrain_model.npz").exists(), 420, "phase 1 of the run", logs)
    server, server_log = deployment["server"]
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0
    assert "stopped" in server_log.read_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", deployment["port"]), timeout=2).close()

    deployment["server"] = deployment["procs"].start(
        "server-restarted",
        "server", "--kit", str(deployment["kits"] / "provision" / "server"), "--host", "127.0.0.1", "--work", str(deployment["work"]),
    )  # fmt: skip
    restarted_log = deployment["server"][1]
    _wait_for(lambda: "ready" in restarted_log.read_text(), 180, "the restarted server", [restarted_log])
    _wait_for(lambda: _online_nodes(admin) == 2, 180, "both sites to reconnect", logs)

    resumed = runs.submit(admin, [TINY], ["run-name='deploy' min-sites=2 resume=true"])
    entry = runs.wait_finished(admin, resumed, timeout_s=420)
    return {"first": first, "resumed": resumed, "entry": entry, "run_dir": run_dir, "admin": admin}


def test_run_completes_over_tls_with_node_authentication(finished_run, deployment):
    assert finished_run["entry"]["status"] == "finished:completed"
    run_dir = finished_run["run_dir"]
    for name in ("results.json", "final_model.npz", "metrics.jsonl", "checkpoint.npz", "pretrain_model.npz"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["failures"] == []
    assert [r["round"] for r in results["history"]["pretrain"]] == [1]
    assert [r["round"] for r in results["history"]["stage"]] == [1]
    # Both sites took part, under secure aggregation (the default) between SuperNodes over TLS: the
    # server pooled the test from the masked sum of both sites' evaluations, and has no site's own.
    assert results["config"]["secure-aggregation"]
    assert results["test"]["secure-aggregation"]["sites"] == ["site-00", "site-01"]
    assert results["test"]["sites"] == {} and results["test"]["n-hips"] > 0
    for entry in results["history"]["pretrain"] + results["history"]["stage"]:
        assert set(entry["bytes"]["secagg-unmask-train-received"]) == {"site-00", "site-01"}
    assert set(results["history"]["inventory"]) == {"site-00", "site-01"}
    server_log = (run_dir / "server.log").read_text()
    assert "resuming" in server_log  # the second submission continued from the checkpoint
    # the SuperLink ran with TLS, node authentication and a persistent state database
    assert (deployment["work"] / "state.db").is_file()
    superlink_log = (deployment["work"] / "superlink.log").read_text()
    assert "https://127.0.0.1" in superlink_log


def test_status_and_logs_through_the_admin_kit(finished_run, capsys):
    admin = finished_run["admin"]
    listed = {int(r["run-id"]): r["status"] for r in runs.runs(admin)}
    assert listed[finished_run["resumed"]] == "finished:completed"
    assert finished_run["first"] in listed
    from server.runs import main as run_main

    assert run_main(["status", "--kit", str(admin.kit)]) == 0
    assert str(finished_run["resumed"]) in capsys.readouterr().out
    text = runs.logs(admin, finished_run["resumed"])
    assert "pooled test macro AUROC" in text or "ROUND" in text


def test_unregistered_site_key_is_refused(finished_run, deployment, tmp_path):
    add_site(deployment["kits"], "site-99")  # issued, never registered with the running server
    done = subprocess.run(
        [sys.executable, "-m", "common.cli", "site", "--kit", str(deployment["kits"] / "hospitals" / "site-99"),
         "--data", str(tmp_path), "--skip-check", "--log", str(tmp_path / "site.log"),
         "--runtime-port", str(_free_port()), "--auth-grace", "5"],
        cwd=PROJECT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 4, done.stdout + done.stderr
    assert "does not know this site's key" in done.stderr and "site.pub" in done.stderr


def test_site_that_does_not_trust_the_ca_is_refused(finished_run, deployment, tmp_path):
    foreign = tmp_path / "foreign"
    make_federation(foreign, f"127.0.0.1:{deployment['port']}", ["site-00"])
    done = subprocess.run(
        [sys.executable, "-m", "common.cli", "site", "--kit", str(foreign / "hospitals" / "site-00"),
         "--data", str(tmp_path), "--skip-check", "--log", str(tmp_path / "site.log"),
         "--runtime-port", str(_free_port())],
        cwd=PROJECT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 4
    assert "not signed by this federation's CA" in done.stderr


def test_plaintext_connection_is_refused(finished_run, deployment):
    with socket.create_connection(("127.0.0.1", deployment["port"]), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            reply = sock.recv(1024)
        except (ConnectionResetError, TimeoutError):
            reply = b""
    assert not reply.startswith(b"HTTP/")  # no plaintext answer: TLS or nothing
    context = ssl.create_default_context(cafile=str(deployment["kits"] / "admins" / "admin" / "ca.pem"))
    with socket.create_connection(("127.0.0.1", deployment["port"]), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_no_private_key_in_logs_bundle_or_server_files(finished_run, deployment):
    kits = deployment["kits"]
    secrets = [p.read_bytes() for p in kits.rglob("*.key")]
    bodies = [line for key in secrets for line in key.splitlines()[1:3]]
    written = [p for p in deployment["work"].rglob("*") if p.is_file()]  # state.db holds the FABs
    written += [p for p in deployment["root"].glob("*.out")] + [p for p in deployment["root"].glob("*.log")]
    assert any(p.name == "state.db" for p in written)
    for path in written:
        content = path.read_bytes()
        assert b"PRIVATE KEY" not in content, path
        for body in bodies:
            assert body not in content, path
    run_logs = runs.logs(finished_run["admin"], finished_run["resumed"]).encode()
    assert b"PRIVATE KEY" not in run_logs and not any(body in run_logs for body in bodies)
