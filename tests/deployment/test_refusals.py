"""Refusals a hospital's IT team can act on, without Flower: expired, foreign or missing TLS; unusable data."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import daemon as site_daemon
from server.daemon import ServerDaemon, ServerKit
from tests.deployment.kits import make_federation
from tests.deployment.test_end_to_end import _free_port


class _Endpoint:
    """A loopback server on a thread: TLS with the given certificate, or plaintext HTTP."""

    def __init__(self, cert: Path | None, key: Path | None) -> None:
        self.port = _free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.context = None
        if cert is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(cert, key)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                if self.context is not None:
                    conn = self.context.wrap_socket(conn, server_side=True)
                else:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)


def _kits(root: Path, **kwargs) -> Path:
    make_federation(root, "127.0.0.1:9092", ["site-a"], **kwargs)
    return root


@pytest.fixture
def endpoint() -> Iterator:
    made: list[_Endpoint] = []

    def start(cert: Path | None = None, key: Path | None = None) -> _Endpoint:
        made.append(_Endpoint(cert, key))
        return made[-1]

    yield start
    for server in made:
        server.close()


def _site_main(kit: Path, port: int, tmp_path: Path, capsys) -> tuple[int, str]:
    """``onfh site`` against 127.0.0.1:port (the kit's address rewritten), data check skipped."""
    settings = kit / "site.json"
    settings.write_text(settings.read_text().replace("127.0.0.1:9092", f"127.0.0.1:{port}"))
    code = site_daemon.main(
        ["--kit", str(kit), "--data", str(tmp_path), "--skip-check", "--log", str(tmp_path / "site.log")]
    )
    return code, capsys.readouterr().err


def test_expired_server_certificate_is_refused_by_the_site(tmp_path, endpoint, capsys):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    kits = _kits(tmp_path / "kits", server_days=10, now=past)
    server = endpoint(
        kits / "provision" / "server" / "server.pem", kits / "provision" / "server" / "server.key"
    )
    code, err = _site_main(kits / "hospitals" / "site-a", server.port, tmp_path, capsys)
    assert code == site_daemon.EXIT_REFUSED
    assert "expired certificate" in err and "renew" in err


def test_expired_server_certificate_is_refused_by_the_server_daemon(tmp_path):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    kits = _kits(tmp_path / "kits", server_days=10, now=past)
    daemon = ServerDaemon(ServerKit.load(kits / "provision" / "server"), tmp_path / "work")
    with pytest.raises(RuntimeError, match="expired on .* --renew-server"):
        daemon.start()
    assert not daemon.procs  # nothing was started


def test_server_signed_by_another_ca_is_refused(tmp_path, endpoint, capsys):
    ours, theirs = _kits(tmp_path / "ours"), _kits(tmp_path / "theirs")
    server = endpoint(
        theirs / "provision" / "server" / "server.pem", theirs / "provision" / "server" / "server.key"
    )
    code, err = _site_main(ours / "hospitals" / "site-a", server.port, tmp_path, capsys)
    assert code == site_daemon.EXIT_REFUSED
    assert "not signed by this federation's CA" in err and "ask the central host" in err


def test_server_without_tls_is_refused(tmp_path, endpoint, capsys):
    kits = _kits(tmp_path / "kits")
    server = endpoint()  # plaintext HTTP
    code, err = _site_main(kits / "hospitals" / "site-a", server.port, tmp_path, capsys)
    assert code == site_daemon.EXIT_REFUSED
    assert "does not speak TLS" in err and "never joins without TLS" in err


def test_server_down_is_waited_for_not_refused(tmp_path):
    kits = _kits(tmp_path / "kits")
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    reason = site_daemon.check_server(address, kits / "hospitals" / "site-a" / "ca.pem")
    assert reason is not None and "Refused" in reason


def test_readable_site_key_is_refused(tmp_path, capsys):
    kit = _kits(tmp_path / "kits") / "hospitals" / "site-a"
    (kit / "site.key").chmod(0o644)
    code = site_daemon.main(["--kit", str(kit), "--data", str(tmp_path), "--skip-check"])
    assert code == site_daemon.EXIT_REFUSED
    assert "chmod 600" in capsys.readouterr().err


def test_unusable_data_is_refused_before_joining(tmp_path, capsys):
    kit = _kits(tmp_path / "kits") / "hospitals" / "site-a"
    empty = tmp_path / "export"
    empty.mkdir()
    (empty / "readme.txt").write_text("not DICOM")
    code = site_daemon.main(["--kit", str(kit), "--data", str(empty), "--cache", str(tmp_path / "cache")])
    assert code == site_daemon.EXIT_DATA_UNUSABLE
    err = capsys.readouterr().err
    assert "no usable hip" in err and "onfh check" in err


def test_supernode_output_is_turned_into_actions(tmp_path):
    kit = site_daemon.SiteKit.load(_kits(tmp_path / "kits") / "hospitals" / "site-a")
    unknown = site_daemon.refusal_from_output(["Failed to activate SuperNode."], kit)
    assert unknown is not None and "site.pub" in str(unknown) and "onfh server register" in str(unknown)
    untrusted = site_daemon.refusal_from_output(
        ["[SSL: CERTIFICATE_VERIFY_FAILED] unable to get issuer"], kit
    )
    assert untrusted is not None and "ca.pem" in str(untrusted)
    assert site_daemon.refusal_from_output(["Connection attempt failed, retrying"], kit) is None
