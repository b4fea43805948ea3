"""A site whose network drops during a run rejoins: site-01 reaches the server (loopback, TLS, node
authentication) through a TCP relay that the test cuts mid-run until the server marks the site offline,
then restores. The run finishes; the site misses only the round(s) of the outage, the failure is
recorded, and it takes part again in later rounds."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from server import runs
from tests.deployment.kits import make_federation
from tests.deployment.test_end_to_end import TINY, Processes, _free_port, _wait_for
from tests.deployment.test_late_site import stage_rounds, start_server, start_site

pytestmark = pytest.mark.slow

STAGE_ROUNDS = 5  # cut after round 1; back for rounds 4-5 at the latest


class Relay:
    """A TCP relay from 127.0.0.1:``port`` to 127.0.0.1:``upstream``: ``cut()`` drops every connection
    and refuses new ones (the site's network is down); ``restore()`` listens again on the same port."""

    def __init__(self, upstream: int) -> None:
        self.port, self.upstream = _free_port(), upstream
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the port comes back
        self.listener.settimeout(0.2)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        with self.lock:
            dropped, self.sockets = self.sockets, []
        for sock in dropped:
            _close(sock)

    def _accept(self, listener: socket.socket) -> None:
        while self.listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                _close(client)
                continue
            client.settimeout(None)
            server.settimeout(None)
            with self.lock:
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    _close(source)
    _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _statuses(admin: runs.AdminKit) -> dict[str, str]:
    """Node id -> status ('online', 'offline', ...) from ``flwr supernode ls``."""
    done = admin.flwr("supernode", "ls", runs.CONNECTION, "--format", "json")
    if done.returncode != 0:
        return {}
    reply = json.loads(done.stdout[done.stdout.find("{") :])
    return {str(n["node-id"]): str(n["status"]) for n in reply.get("nodes", [])}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_federation) -> Iterator[dict]:
    """A running server; site-00 connects directly, site-01 through the relay (its kit dials the relay)."""
    root = tmp_path_factory.mktemp("rejoin")
    kits, work, port = root / "kits", root / "server-work", _free_port()
    make_federation(kits, f"127.0.0.1:{port}", ["site-00", "site-01"])
    relay = Relay(port)
    relay.restore()
    site_json = kits / "hospitals" / "site-01" / "site.json"
    site_json.write_text(json.dumps({"site-name": "site-01", "server-address": f"127.0.0.1:{relay.port}"}))
    procs = Processes(root)
    try:
        server = start_server(procs, kits, work)
        node_of = dict(re.findall(r"site ([\w-]+): registered \(node (\d+)\)", server[1].read_text()))
        sites = {s: start_site(procs, root, kits, s, tiny_federation / s) for s in ("site-00", "site-01")}
        admin = runs.AdminKit(kits / "admins" / "admin")
        logs = [server[1], root / "site-00.out", root / "site-01.out"]
        online = lambda: list(_statuses(admin).values()).count("online") == 2  # noqa: E731
        _wait_for(online, 240, "both sites to connect", logs)
        yield {"root": root, "work": work, "admin": admin, "relay": relay, "sites": sites, "node_of": node_of}
    finally:
        relay.cut()
        procs.stop_all()


def test_site_whose_network_drops_rejoins_and_the_run_finishes(federation):
    root, work, admin, relay = (
        federation["root"],
        federation["work"],
        federation["admin"],
        federation["relay"],
    )
    node = federation["node_of"]["site-01"]
    run_dir = work / "outputs" / "rejoin"
    logs = [root / "server.out", root / "site-01.out", root / "site-01.log"]
    # In the clear: with two sites secure aggregation needs both, so the rounds without site-01
    # would reveal nothing (tests/server/test_secure_aggregation.py covers dropouts under masking).
    run_id = runs.submit(
        admin,
        [TINY],
        [
            f"run-name='rejoin' min-sites=1 pretrained=false stage-rounds={STAGE_ROUNDS} secure-aggregation=false"
        ],
    )
    _wait_for(lambda: len(stage_rounds(run_dir)) >= 1, 600, "staging round 1", logs)

    cut_at = time.time()
    relay.cut()  # site-01's network is down: its connections drop, new ones are refused
    # The SuperLink marks a node offline after two missed heartbeats (Flower: 2 x 30 s).
    _wait_for(
        lambda: _statuses(admin).get(node) == "offline", 150, "the server to mark site-01 offline", logs
    )
    relay.restore()
    _wait_for(lambda: _statuses(admin).get(node) == "online", 150, "site-01 to reconnect", logs)
    back_at = time.time()

    entry = runs.wait_finished(admin, run_id, timeout_s=900)  # minutes when the CPUs are shared
    assert entry["status"] == "finished:completed", runs.logs(admin, run_id)[-3000:]
    rounds = stage_rounds(run_dir)
    assert [r["round"] for r in rounds] == list(range(1, STAGE_ROUNDS + 1))
    both = {"site-00", "site-01"}
    missed = [r for r in rounds if "site-01" not in r["sites"]]
    assert missed, rounds  # the outage cost site-01 at least the round in flight
    # ... and only rounds that were under way while it was cut off.
    assert all(r["ended"] >= cut_at and r["started"] <= back_at for r in missed), (rounds, cut_at, back_at)
    assert all(r["sites"] == both for r in rounds if r["ended"] < cut_at)
    later = [r for r in rounds if r["started"] > back_at]
    assert later and all(r["sites"] == both for r in later), (rounds, back_at)

    results = json.loads((run_dir / "results.json").read_text())
    dropped = [f for f in results["failures"] if f["site"] in ("site-01", f"node-{node}")]
    assert dropped and all(f["phase"] == "stage" for f in dropped), results["failures"]
    assert {f["round"] for f in dropped} <= {r["round"] for r in missed}
    assert federation["sites"]["site-01"][0].poll() is None  # 'onfh site' rode out the outage
    site_log = (root / "site-01.log").read_text()
    assert "lost the connection to the server" in site_log  # said in plain words by 'onfh site'
    assert "connection to the server is back" in site_log or "reconnecting" in site_log
