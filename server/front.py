"""The TLS front of the central host: the only doors the hospitals and the admins can reach.

Flower 1.42's open-source SuperLink serves its Fleet (sites), Control (admins) and Runtime (its
own ServerApp) HTTP APIs on one listener and does not authenticate the Control API: whoever
reaches it can register node keys and submit runs. So ``onfh server`` binds the SuperLink to
loopback and puts this front before it, with two doors:

- the **site door** (the provisioned port): TLS with the server certificate; forwards
  ``/v1/fleet/*`` only. Sites prove who they are with their node key, which the SuperLink checks;
  a key the server kit lists in ``revoked/`` is refused here already.
- the **admin door** (the admin port): TLS that requires a client certificate issued by the
  federation's CA for an admin (extended key usage clientAuth, only ever given to admins);
  forwards ``/v1/control/*``.

The Runtime API is never forwarded: only processes on the central host reach it. Every admin
request and every refusal is appended to ``WORK/audit.jsonl`` (time, door, who, path, status).

TLS, including the client certificate check, is uvicorn's (OpenSSL); forwarding is httpx's. This
module holds only the routing policy. The same app, with a client certificate towards the
server, is the admin's local relay (``onfh run``): Flower's ``flwr`` CLI cannot present one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from cryptography.hazmat.primitives import serialization
from uvicorn.protocols.http.h11_impl import H11Protocol

FLEET_PREFIXES = ("/v1/fleet/",)
CONTROL_PREFIXES = ("/v1/control/", "/health")
PUBLIC_KEY_HEADER = "flwr-public-key"  # flwr.supercore.constant.FLEET_HTTP_PUBLIC_KEY_HEADER
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
PEERS: dict[tuple, str] = {}  # (client host, port) -> the admin certificate's common name


class AuditLog:
    """Append-only JSON lines (mode 0600); one line per admin request and per refusal."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        line = json.dumps({"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **record})
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


class RevokedKeys:
    """Node public keys of ``revoked/*.pub`` (OpenSSH) as the PEM bytes Flower's Fleet header carries."""

    def __init__(self, folder: Path | None) -> None:
        self.folder, self._stamp, self._keys = folder, None, frozenset()

    def __contains__(self, pem: bytes) -> bool:
        return pem in self.keys()

    def keys(self) -> frozenset[bytes]:
        if self.folder is None or not self.folder.is_dir():
            return frozenset()
        stamp = self.folder.stat().st_mtime_ns
        if stamp != self._stamp:  # re-read only when a key was revoked since
            found = set()
            for path in self.folder.glob("*.pub"):
                key = serialization.load_ssh_public_key(path.read_bytes())
                found.add(
                    key.public_bytes(
                        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                    )
                )
            self._stamp, self._keys = stamp, frozenset(found)
        return self._keys


class Door:
    """An ASGI app that forwards requests under ``prefixes`` to ``upstream`` and refuses the rest."""

    def __init__(
        self,
        name: str,
        prefixes: tuple[str, ...],
        upstream: str,
        upstream_tls: ssl.SSLContext | bool,
        audit: AuditLog,
        revoked: RevokedKeys | None = None,
        audit_all: bool = False,
    ) -> None:
        self.name, self.prefixes, self.audit, self.revoked, self.audit_all = (
            name,
            prefixes,
            audit,
            revoked,
            audit_all,
        )
        # No kept-alive upstream connections: the SuperLink's uvicorn closes an idle one after 5 s,
        # and a request sent on it as it closes fails (a 502 for an admin polling every few
        # seconds). A fresh loopback connection per request costs next to nothing.
        self.client = httpx.AsyncClient(
            base_url=upstream,
            verify=upstream_tls,
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.client)
            return
        if scope["type"] != "http":
            return
        path, who = scope["path"], PEERS.get(tuple(scope.get("client") or ()), "")
        where = (scope.get("client") or ["?"])[0]
        refusal = self.refusal(path, scope)
        if refusal:
            self.audit.write(
                door=self.name,
                who=who or "unauthenticated",
                client=where,
                path=path,
                status=403,
                refused=refusal,
            )
            await _reply(send, 403, f"refused by the onfh front ({self.name} door): {refusal}\n")
            return
        status = await self.forward(scope, receive, send)
        if self.audit_all:
            self.audit.write(door=self.name, who=who, client=where, path=path, status=status)

    def refusal(self, path: str, scope: dict) -> str | None:
        """Why this request may not pass this door, or None."""
        if not path.startswith(self.prefixes):
            return f"{path} is not served on this door"
        if self.revoked is not None:
            header = dict(scope["headers"]).get(PUBLIC_KEY_HEADER.encode())
            if header:
                try:
                    pem = base64.b64decode(header, validate=True)
                except ValueError:
                    return "malformed node public key header"
                if pem in self.revoked:
                    return "this site's key was revoked by the federation"
        return None

    async def forward(self, scope: dict, receive: Callable, send: Callable) -> int:
        """Send the request upstream and stream the answer back; returns the upstream status."""
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in HOP_BY_HOP]
        url = scope["path"] + (("?" + scope["query_string"].decode()) if scope.get("query_string") else "")
        request = self.client.build_request(scope["method"], url, headers=headers, content=bytes(body))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await _reply(
                send, 502, f"the SuperLink behind the onfh front did not answer: {type(exc).__name__}\n"
            )
            return 502
        try:
            out = [(k, v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()
        return response.status_code


async def _lifespan(receive: Callable, send: Callable, client: httpx.AsyncClient) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _reply(send: Callable, status: int, text: str) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]}
    )
    await send({"type": "http.response.body", "body": text.encode()})


class PeerAwareH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, remembering the verified client certificate's name per connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        if cert and self.client:
            names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
            PEERS[tuple(self.client)] = names[0] if names else "admin"

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client:
            PEERS.pop(tuple(self.client), None)
        super().connection_lost(exc)


def upstream_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """TLS towards the next hop: verified against the federation's CA, with a client certificate if given."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def door_server(app: Door, host: str, port: int, kit: Path, require_client_cert: bool) -> uvicorn.Server:
    """A uvicorn server for one door, TLS with the server kit's certificate (and client certificates)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=PeerAwareH11,
        ssl_certfile=str(kit / "server.pem"),
        ssl_keyfile=str(kit / "server.key"),
        ssl_ca_certs=str(kit / "ca.pem") if require_client_cert else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE,
        log_level="warning",
        access_log=False,
        lifespan="on",
        ws="none",
    )
    return uvicorn.Server(config)


async def serve(kit: Path, work: Path, host: str, site_port: int, admin_port: int, upstream: str) -> None:
    """Serve both doors until stopped."""
    audit = AuditLog(work / "audit.jsonl")
    tls = upstream_context(kit / "ca.pem")
    site = Door("site", FLEET_PREFIXES, upstream, tls, audit, revoked=RevokedKeys(kit / "revoked"))
    admin = Door("admin", CONTROL_PREFIXES, upstream, tls, audit, audit_all=True)
    servers = [
        door_server(site, host, site_port, kit, False),
        door_server(admin, host, admin_port, kit, True),
    ]
    await asyncio.gather(*(s.serve() for s in servers))


class LocalRelay:
    """The admin's relay for one command: plain HTTP on 127.0.0.1 for ``flwr``, mutual TLS onwards.

    ``with LocalRelay(address, ca, cert, key) as local:`` gives the ``HOST:PORT`` to point ``flwr``
    at; it forwards the Control API only, with the admin's certificate, and is gone afterwards.
    """

    def __init__(self, admin_address: str, ca: Path, cert: Path, key: Path) -> None:
        tls = upstream_context(ca, cert, key)
        app = Door("relay", CONTROL_PREFIXES, f"https://{admin_address}", tls, AuditLog(None))
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the admin's local relay did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    """``python -m server.front --kit KIT --work WORK --host H --site-port P --admin-port Q --upstream URL``."""
    parser = argparse.ArgumentParser(prog="python -m server.front", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--site-port", type=int, required=True)
    parser.add_argument("--admin-port", type=int, required=True)
    parser.add_argument(
        "--upstream", required=True, help="the SuperLink's loopback URL, https://127.0.0.1:PORT"
    )
    args = parser.parse_args(argv)
    asyncio.run(serve(args.kit, args.work, args.host, args.site_port, args.admin_port, args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
