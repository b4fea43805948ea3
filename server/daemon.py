"""``onfh server --kit DIR``: the central host's daemon around ``flower-superlink``.

Starts the SuperLink with TLS (the kit's certificate), SuperNode authentication, a persistent
state database and no run-time dependency installation; waits until its Control API answers;
registers every site key in the kit's ``site-keys/``; stops cleanly on SIGTERM or Ctrl-C.

``onfh server register --kit DIR`` registers the keys of ``site-keys/`` with the server that is
already running (a site added with ``onfh provision --add-site``): no restart, a run in progress
asks the new site from its next round on. Registering is an explicit act of the central host's
administrator, never the side effect of a file appearing in a folder.

Everything it writes goes under the work folder (default ``KIT/work``): ``state.db``,
``superlink.log``, ``flwr-home/`` (installed app bundles) and ``outputs/RUN_NAME/`` (the results
of every run, as in simulation). None of it holds a private key: the kit's ``server.key`` is
only read by the SuperLink.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
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
from common.deployment import flower_executable, flwr_env, flwr_executable, split_address, stop_process_tree
from server.runs import CONNECTION, write_flwr_connection


@dataclass(frozen=True)
class ServerKit:
    """A server kit folder as ``onfh provision`` writes it."""

    kit: Path
    address: str
    port: int

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
        settings = json.loads((kit / "server.json").read_text())
        return cls(kit.absolute(), str(settings["server-address"]), int(settings["port"]))

    def site_keys(self) -> dict[str, Path]:
        """Site name -> its OpenSSH public key file in ``site-keys/``."""
        return {p.stem: p for p in sorted((self.kit / "site-keys").glob("*.pub"))}

    def certificate_expiry(self) -> dt.datetime:
        cert = x509.load_pem_x509_certificate((self.kit / "server.pem").read_bytes())
        return cert.not_valid_after_utc


def superlink_command(kit: ServerKit, work: Path, host: str, port: int) -> list[str]:
    """The ``flower-superlink`` command line: TLS, SuperNode auth, state database, no dependency installs."""
    return [
        flower_executable("flower-superlink"),
        "--ssl-certfile", str(kit.kit / "server.pem"),
        "--ssl-keyfile", str(kit.kit / "server.key"),
        "--ssl-ca-certfile", str(kit.kit / "ca.pem"),
        "--enable-supernode-auth",
        "--database", str(work / "state.db"),
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip


def local_address(host: str, port: int) -> str:
    """Where this host reaches its own SuperLink (bind-all addresses dial loopback)."""
    dial = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{dial}]:{port}" if ":" in dial else f"{dial}:{port}"


def control_api_answers(work: Path) -> bool:
    """True when ``flwr supernode ls`` reaches the SuperLink's Control API over TLS."""
    try:
        done = subprocess.run(
            [flwr_executable(), "supernode", "ls", CONNECTION, "--format", "json"],
            env=flwr_env(work / "flwr-home"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and '"success": true' in done.stdout


def register_site_keys(kit: ServerKit, work: Path) -> dict[str, str]:
    """Register every key of ``site-keys/`` with the running SuperLink under the site's name.

    Returns site -> ``registered (node ID)`` (the node id Flower's logs and ``flwr supernode ls`` show)
    or ``already registered``.
    """
    status: dict[str, str] = {}
    for site, key in kit.site_keys().items():
        done = subprocess.run(
            [flwr_executable(), "supernode", "register", str(key), CONNECTION, "--name", site],
            env=flwr_env(work / "flwr-home"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        text = done.stdout + done.stderr
        if done.returncode == 0:
            node = re.search(r"SuperNode (\d+) registered", text)
            status[site] = f"registered (node {node.group(1)})" if node else "registered"
        elif "already in use" in text:
            status[site] = "already registered"
        else:
            raise RuntimeError(f"registering {key} failed: {text.strip()[-600:]}")
    return status


def _tls_reachable(host: str, port: int, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=3) as raw:
            with context.wrap_socket(raw, server_hostname=host.strip("[]")):
                return True
    except OSError:
        return False


class ServerDaemon:
    """The SuperLink process of one server kit: ``start()``, ``register()``, ``wait()``, ``stop()``."""

    def __init__(self, kit: ServerKit, work: Path, host: str = "0.0.0.0", port: int | None = None) -> None:
        self.kit, self.work, self.host = kit, work.absolute(), host
        self.port = port or kit.port
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the SuperLink and return once its Control API answers over TLS (or raise)."""
        expires = self.kit.certificate_expiry()
        if expires <= dt.datetime.now(dt.UTC):
            raise RuntimeError(
                f"the server certificate {self.kit.kit / 'server.pem'} expired on {expires:%Y-%m-%d %H:%M} UTC: "
                "sites will refuse it; issue a new one with 'onfh provision' (keep ca.key) and restart"
            )
        self.prepare_work()
        dial = local_address(self.host, self.port)
        write_flwr_connection(self.work / "flwr-home", dial, self.kit.kit / "ca.pem")
        log = (self.work / "superlink.log").open("ab")
        self.proc = subprocess.Popen(
            superlink_command(self.kit, self.work, self.host, self.port),
            cwd=self.work,  # ServerApp outputs land in WORK/outputs/RUN_NAME
            env=flwr_env(self.work / "flwr-home"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        host, port = split_address(dial)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with code {self.proc.returncode}; see {self.work / 'superlink.log'} "
                    f"(port {self.port} already in use? pass --port)"
                )
            if _tls_reachable(host, port, self.kit.kit / "ca.pem") and control_api_answers(self.work):
                return
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(
            f"the SuperLink did not answer within {timeout_s:.0f} s; see {self.work / 'superlink.log'}"
        )

    def prepare_work(self) -> None:
        """Create the work folder, readable by this user only."""
        self.work.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o700)

    def register(self) -> dict[str, str]:
        """Register the kit's site keys (safe to repeat)."""
        return register_site_keys(self.kit, self.work)

    def wait(self) -> int:
        """Block until the SuperLink exits; its exit code."""
        assert self.proc is not None
        return self.proc.wait()

    def stop(self) -> int | None:
        """Stop the SuperLink and everything it started."""
        if self.proc is None:
            return None
        return stop_process_tree(self.proc)


def register_with_running_server(daemon: ServerDaemon) -> dict[str, str]:
    """Register the kit's site keys with the SuperLink already running for ``daemon``'s kit (or raise)."""
    dial = local_address(daemon.host, daemon.port)
    daemon.prepare_work()
    write_flwr_connection(daemon.work / "flwr-home", dial, daemon.kit.kit / "ca.pem")
    if not control_api_answers(daemon.work):
        raise RuntimeError(
            f"no SuperLink answers on {dial}: start 'onfh server --kit {daemon.kit.kit}' first (it registers "
            "every key of site-keys/ as it starts), or pass the --host/--port/--work it runs with"
        )
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
        choices=("start", "register"),
        default="start",
        help="start the SuperLink (default), or register the kit's site keys with the running one",
    )
    parser.add_argument("--kit", type=Path, required=True, help="the server kit folder from 'onfh provision'")
    parser.add_argument(
        "--work", type=Path, default=None, help="state, logs and run outputs (default KIT/work)"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the provisioned one)")
    parser.add_argument("--register-only", action="store_true", help="the same as 'onfh server register'")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``onfh server [start|register] --kit DIR [--work DIR] [--host 0.0.0.0] [--port N]``."""
    args = _parser().parse_args(argv)
    try:
        kit = ServerKit.load(args.kit)
        daemon = ServerDaemon(kit, args.work or kit.kit / "work", args.host, args.port)
        if args.register_only or args.action == "register":
            for site, state in register_with_running_server(daemon).items():
                print(f"site {site}: {state}")
            print("registered sites can join now; a run in progress asks a new site from its next round on")
            return 0
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"onfh server: {exc}", file=sys.stderr)
        return 2

    stopping = {"flag": False}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["flag"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        daemon.start()
        print(
            f"SuperLink up on {args.host}:{daemon.port} (TLS, SuperNode authentication); work folder {daemon.work}"
        )
        for site, state in daemon.register().items():
            print(f"site {site}: {state}")
        print(f"server certificate expires {kit.certificate_expiry():%Y-%m-%d} UTC; ready", flush=True)
        code = daemon.wait()
        print(f"onfh server: flower-superlink exited with code {code}; see {daemon.work / 'superlink.log'}")
        return 1
    except KeyboardInterrupt:
        daemon.stop()
        print("onfh server: stopped", flush=True)
        return 0
    except (RuntimeError, FileNotFoundError) as exc:
        daemon.stop()
        print(f"onfh server: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
