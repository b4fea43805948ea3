"""``onfh server --kit DIR``: the central host's daemon: the SuperLink on loopback behind the TLS front.

Starts ``flower-superlink`` bound to 127.0.0.1 only (TLS with the kit's certificate, SuperNode
authentication, a persistent state database, no run-time dependency installation) and the front
(``server/front.py``) on the public address: the site door (the provisioned port, Fleet API only)
and the admin door (the admin port, Control API only, admin client certificate required). Waits
until both answer, registers every site key in the kit's ``site-keys/``, and stops both cleanly
on SIGTERM or Ctrl-C.

``onfh server register --kit DIR`` registers the keys of ``site-keys/`` with the server that is
already running (a site added with ``onfh provision --add-site``): no restart, a run in progress
asks the new site from its next round on. ``onfh server revoke SITE --kit DIR`` removes a site for
good. Registering and revoking are explicit acts of the central host's administrator, recorded in
the audit log, never the side effect of a file appearing in a folder.

Everything it writes goes under the work folder (default ``KIT/work``, mode 0700): ``state.db``,
``superlink.log``, ``front.log``, ``audit.jsonl``, ``nodes.json``, ``superlink.json`` (the loopback
port), ``flwr-home/`` and ``outputs/RUN_NAME/`` (the results of every run). None of it holds a
private key: the kit's ``server.key`` is only read by the SuperLink and the front.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from common.cli import description
from common.deployment import flower_executable, flwr_env, stop_process_tree
from common.files import write_atomic
from common.keys import private_key_problem
from server.registry import control_api_answers, register_site_keys, revoke_site
from server.runs import write_flwr_connection


@dataclass(frozen=True)
class ServerKit:
    """A server kit folder as ``onfh provision`` writes it."""

    kit: Path
    address: str
    port: int
    admin_port: int

    @classmethod
    def load(cls, kit: Path) -> ServerKit:
        missing = [
            n for n in ("ca.pem", "server.pem", "server.key", "server.json") if not (kit / n).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"{kit} is not a server kit ({', '.join(missing)} missing): pass the 'server' folder that "
                "'onfh provision' wrote"
            )
        if problem := private_key_problem(kit / "server.key"):
            raise ValueError(f"{problem} (and consider renewing it: 'onfh provision OUT --renew-server')")
        settings = json.loads((kit / "server.json").read_text())
        port = int(settings["port"])
        return cls(
            kit.absolute(), str(settings["server-address"]), port, int(settings.get("admin-port", port + 1))
        )

    def site_keys(self) -> dict[str, Path]:
        """Site name -> its OpenSSH public key file in ``site-keys/``."""
        return {p.stem: p for p in sorted((self.kit / "site-keys").glob("*.pub"))}

    @property
    def revoked(self) -> Path:
        return self.kit / "revoked"

    def certificate_expiry(self) -> dt.datetime:
        cert = x509.load_pem_x509_certificate((self.kit / "server.pem").read_bytes())
        return cert.not_valid_after_utc


def superlink_command(kit: ServerKit, work: Path, port: int) -> list[str]:
    """``flower-superlink`` on loopback: TLS, SuperNode auth, state database, no dependency installs."""
    return [
        flower_executable("flower-superlink"),
        "--ssl-certfile", str(kit.kit / "server.pem"),
        "--ssl-keyfile", str(kit.kit / "server.key"),
        "--ssl-ca-certfile", str(kit.kit / "ca.pem"),
        "--enable-supernode-auth",
        "--database", str(work / "state.db"),
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip


def front_command(
    kit: ServerKit, work: Path, host: str, port: int, admin_port: int, upstream: int
) -> list[str]:
    """The front's command line: both doors on ``host``, forwarding to the SuperLink's loopback port."""
    return [
        sys.executable, "-m", "server.front",
        "--kit", str(kit.kit), "--work", str(work), "--host", host,
        "--site-port", str(port), "--admin-port", str(admin_port),
        "--upstream", f"https://127.0.0.1:{upstream}",
    ]  # fmt: skip


def free_port() -> int:
    """A free TCP port on loopback (for the SuperLink, which only the front and this host reach)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_dial(host: str) -> str:
    """Where this host reaches a door bound to ``host`` (bind-all addresses dial loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _tls_reachable(host: str, port: int, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=3) as raw:
            with context.wrap_socket(raw, server_hostname=host.strip("[]")):
                return True
    except OSError:
        return False


class ServerDaemon:
    """The SuperLink and the front of one server kit: ``start()``, ``register()``, ``wait()``, ``stop()``."""

    def __init__(
        self,
        kit: ServerKit,
        work: Path,
        host: str = "0.0.0.0",
        port: int | None = None,
        admin_port: int | None = None,
    ) -> None:
        self.kit, self.work, self.host = kit, work.absolute(), host
        self.port = port or kit.port
        self.admin_port = admin_port or kit.admin_port
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the SuperLink and the front; return once both answer over TLS (or raise)."""
        expires = self.kit.certificate_expiry()
        if expires <= dt.datetime.now(dt.UTC):
            raise RuntimeError(
                f"the server certificate {self.kit.kit / 'server.pem'} expired on {expires:%Y-%m-%d %H:%M} UTC: "
                "sites will refuse it; renew it with 'onfh provision OUT --renew-server' (same CA, site kits "
                "stay valid), copy server.pem and server.key into the kit, and restart"
            )
        self.prepare_work()
        upstream = free_port()
        write_atomic(self.work / "superlink.json", json.dumps({"port": upstream}).encode(), mode=0o600)
        write_flwr_connection(self.work / "flwr-home", f"127.0.0.1:{upstream}", self.kit.kit / "ca.pem")
        self._spawn("superlink", superlink_command(self.kit, self.work, upstream))
        self._spawn(
            "front", front_command(self.kit, self.work, self.host, self.port, self.admin_port, upstream)
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"{name} exited with code {proc.returncode}; see {self.work / (name + '.log')} "
                        f"(port {self.port} or {self.admin_port} already in use? pass --port / --admin-port)"
                    )
            dial = local_dial(self.host)
            if _tls_reachable(dial, self.port, self.kit.kit / "ca.pem") and control_api_answers(self.work):
                return
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"the server did not answer within {timeout_s:.0f} s; see {self.work}/*.log")

    def _spawn(self, name: str, command: list[str]) -> None:
        log = (self.work / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            command,
            cwd=self.work,  # ServerApp outputs land in WORK/outputs/RUN_NAME
            env=flwr_env(self.work / "flwr-home"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def prepare_work(self) -> None:
        """Create the work folder, readable by this user only."""
        self.work.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o700)

    def register(self) -> dict[str, str]:
        """Register the kit's site keys (safe to repeat; revoked sites refused)."""
        return register_site_keys(self.kit.site_keys(), self.kit.revoked, self.work)

    def wait(self) -> int:
        """Block until the SuperLink or the front exits; its exit code (the other is stopped)."""
        while True:
            for proc in self.procs.values():
                if proc.poll() is not None:
                    self.stop()
                    return proc.returncode
            time.sleep(1.0)

    def stop(self) -> int | None:
        """Stop the front, then the SuperLink and everything it started."""
        codes = [stop_process_tree(proc) for proc in reversed(list(self.procs.values()))]
        return codes[-1] if codes else None


def attach(daemon: ServerDaemon) -> None:
    """Point ``daemon``'s work folder at the SuperLink already running for it (or raise)."""
    record = daemon.work / "superlink.json"
    if record.exists():
        port = json.loads(record.read_text())["port"]
        write_flwr_connection(daemon.work / "flwr-home", f"127.0.0.1:{port}", daemon.kit.kit / "ca.pem")
    if not record.exists() or not control_api_answers(daemon.work):
        raise RuntimeError(
            f"no running server found for work folder {daemon.work}: start 'onfh server --kit {daemon.kit.kit}' "
            "first (it registers every key of site-keys/ as it starts), or pass the --work it runs with"
        )


def register_with_running_server(daemon: ServerDaemon) -> dict[str, str]:
    """Register the kit's site keys with the SuperLink already running for ``daemon``'s kit (or raise)."""
    attach(daemon)
    return daemon.register()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onfh server",
        description=description(__doc__, full=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "action",
        nargs="?",
        choices=("start", "register", "revoke"),
        default="start",
        help="start the server (default), register the kit's site keys with the running one, or revoke a site",
    )
    parser.add_argument("site", nargs="?", help="the site to revoke ('revoke' only)")
    parser.add_argument("--kit", type=Path, required=True, help="the server kit folder from 'onfh provision'")
    parser.add_argument(
        "--work", type=Path, default=None, help="state, logs and run outputs (default KIT/work)"
    )
    parser.add_argument(
        "--host", default="0.0.0.0", help="address the doors listen on (default: all interfaces)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="site door port (default: the provisioned one)"
    )
    parser.add_argument("--admin-port", type=int, default=None, help="admin door port (default: provisioned)")
    parser.add_argument("--register-only", action="store_true", help="the same as 'onfh server register'")
    return parser


def _serve(daemon: ServerDaemon, kit: ServerKit) -> int:
    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        daemon.start()
        print(
            f"server up: site door {daemon.host}:{daemon.port} (Fleet API, TLS, SuperNode authentication), "
            f"admin door {daemon.host}:{daemon.admin_port} (Control API, admin certificate); SuperLink on "
            f"loopback only; work folder {daemon.work}"
        )
        for site, state in daemon.register().items():
            print(f"site {site}: {state}")
        print(f"server certificate expires {kit.certificate_expiry():%Y-%m-%d} UTC; ready", flush=True)
        code = daemon.wait()
        print(f"onfh server: a server process exited with code {code}; see {daemon.work}/*.log")
        return 1
    except KeyboardInterrupt:
        daemon.stop()
        print("onfh server: stopped", flush=True)
        return 0
    except (RuntimeError, FileNotFoundError) as exc:
        daemon.stop()
        print(f"onfh server: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """``onfh server [start|register|revoke SITE] --kit DIR [--work DIR] [--host H] [--port N] [--admin-port N]``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.action == "revoke" and not args.site:
        parser.error("revoke needs the site's name: onfh server revoke SITE --kit DIR")
    try:
        kit = ServerKit.load(args.kit)
        daemon = ServerDaemon(kit, args.work or kit.kit / "work", args.host, args.port, args.admin_port)
        if args.register_only or args.action == "register":
            for site, state in register_with_running_server(daemon).items():
                print(f"site {site}: {state}")
            print("registered sites can join now; a run in progress asks a new site from its next round on")
            return 0
        if args.action == "revoke":
            attach(daemon)
            print(revoke_site(args.site, kit.kit / "site-keys", kit.revoked, daemon.work))
            return 0
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"onfh server: {exc}", file=sys.stderr)
        return 2
    return _serve(daemon, kit)


if __name__ == "__main__":
    sys.exit(main())
