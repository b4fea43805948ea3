"""``onfh site --kit DIR --data DIR``: a hospital's daemon around ``flower-supernode``.

1. Checks the site's data (as ``onfh check``) and refuses to join with nothing usable.
2. Checks the server before dialling it: a TLS handshake verified against the kit's CA and the
   server's name. A server that is down is waited for; a certificate that is expired, signed by
   another CA, or for another name, and a server without TLS, are refused with what to do.
3. Starts ``flower-supernode`` with the CA, the site's private key and the node config
   (``data-dir``, ``site-name``, ``cache-dir``, ``device``). If the SuperNode stops because the
   server went away, the daemon waits for the server and starts it again; a key the server does
   not know is refused with what to send to the central host.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from common.cli import description
from common.config import PreprocessSettings, RunConfig
from common.deployment import flower_executable, flwr_env, split_address, stop_process_tree
from common.sitedata.load import load_site

EXIT_STOPPED = 0
EXIT_BAD_ARGS = 2
EXIT_DATA_UNUSABLE = 3
EXIT_REFUSED = 4
RETRY_MAX_S = 30.0


class SiteRefused(RuntimeError):
    """A problem retrying cannot fix; the message says what the hospital's IT team should do."""


class KeyUnknown(SiteRefused):
    """The server does not (yet) know this site's key: it may be registering it right now."""


class DataUnusable(SiteRefused):
    """The site's data folder gives nothing to train on."""


@dataclass(frozen=True)
class SiteKit:
    """A site kit folder as ``onfh provision`` writes it."""

    kit: Path
    site_name: str
    address: str

    @classmethod
    def load(cls, kit: Path) -> SiteKit:
        missing = [n for n in ("ca.pem", "site.key", "site.json") if not (kit / n).is_file()]
        if missing:
            raise SiteRefused(
                f"{kit} is not a site kit ({', '.join(missing)} missing): pass the folder 'onfh provision' "
                "wrote for this hospital (sites/NAME)"
            )
        mode = stat.S_IMODE((kit / "site.key").stat().st_mode)
        if mode & 0o077:
            raise SiteRefused(
                f"{kit / 'site.key'} can be read by other users (mode {mode:o}): run 'chmod 600 {kit / 'site.key'}'"
            )
        settings = json.loads((kit / "site.json").read_text())
        return cls(kit.absolute(), str(settings["site-name"]), str(settings["server-address"]))


def check_data(data: Path, cache: Path, settings: PreprocessSettings) -> str:
    """Load the site as training will (building the cache); a one-line summary, or SiteRefused."""
    if not data.is_dir():
        raise DataUnusable(f"data folder {data} does not exist: pass the folder holding the DICOM export")
    try:
        site = load_site(data, cache, settings, progress=lambda line: print(line, file=sys.stderr))
    except (ValueError, OSError) as exc:
        raise DataUnusable(f"the site data cannot be read: {exc}") from None
    hips, labelled, pairs = len(site.stages), int((site.stages > 0).sum()), len(site.pairs_mr)
    errors = site.problems.counts()["error"]
    if hips == 0:
        raise DataUnusable(
            f"no usable hip in {data} ({errors} errors): run 'onfh check {data}' and fix what it lists "
            "(a coronal T1 series per patient and labels.csv are the minimum); not joining the federation"
        )
    return f"{hips} hips ({labelled} labelled), {pairs} MR-CT pairs, {errors} data errors (see 'onfh check')"


def check_server(address: str, ca: Path, timeout_s: float = 5.0) -> str | None:
    """TLS handshake with the server, verified against ``ca`` and the server's name.

    Returns None when the server is trustworthy, or a reason when it cannot be reached (worth
    retrying). Raises SiteRefused for what retrying cannot fix.
    """
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca))
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    try:
        with context.wrap_socket(raw, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
            raise SiteRefused(
                f"the server {address} presents an expired certificate: ask the central host to renew it "
                "('onfh provision' with the federation's CA) and restart 'onfh server'; do not disable TLS"
            ) from None
        if exc.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            raise SiteRefused(
                f"the server's certificate is not for {host}: check server-address in {ca.parent / 'site.json'} "
                "against the address the central host was provisioned with"
            ) from None
        raise SiteRefused(
            f"the server {address} is not signed by this federation's CA ({ca}): {exc.verify_message}. "
            "Either this kit belongs to another federation (ask the central host for this site's kit) or "
            "something between this hospital and the server intercepts TLS (ask your network team to "
            f"allow a direct TLS connection to {address})"
        ) from None
    except (ssl.SSLError, ConnectionResetError) as exc:
        raise SiteRefused(
            f"the server {address} does not speak TLS ({type(exc).__name__}: {exc}): this is not the onfh "
            "server, or it runs without encryption; the site never joins without TLS"
        ) from None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    finally:
        raw.close()


def node_config(site: str, data: Path, cache: Path, device: str) -> str:
    """The ``--node-config`` string (TOML values) the ClientApp reads through ``SiteConfig``."""
    values = {
        "data-dir": str(data.absolute()),
        "site-name": site,
        "cache-dir": str(cache.absolute()),
        "device": device,
    }
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def supernode_command(kit: SiteKit, config: str, runtime_port: int) -> list[str]:
    """The ``flower-supernode`` command line: TLS with the kit's CA, the site key, the node config."""
    return [
        flower_executable("flower-supernode"),
        "--superlink", kit.address,
        "--root-certificates", str(kit.kit / "ca.pem"),
        "--auth-supernode-private-key", str(kit.kit / "site.key"),
        "--node-config", config,
        "--port", str(runtime_port),
    ]  # fmt: skip


def refusal_from_output(lines: list[str], kit: SiteKit) -> SiteRefused | None:
    """What a SuperNode's last lines say that retrying cannot fix, as a refusal; None otherwise."""
    text = "\n".join(lines)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return SiteRefused(
            f"the SuperNode does not trust the server {kit.address}: {text.split('CERTIFICATE_VERIFY_FAILED', 1)[1][:120]}"
            f" -- check that {kit.kit / 'ca.pem'} is the federation's CA"
        )
    if "flower-supernode: error:" in text:
        return SiteRefused(
            f"flower-supernode refused its arguments: {text.split('flower-supernode: error:', 1)[1][:200]}"
        )
    if "address already in use" in text:
        return SiteRefused(
            "the SuperNode's local runtime port is taken by another program: pass --runtime-port with a free port"
        )
    if "Failed to activate SuperNode" in text:
        return KeyUnknown(
            f"the server does not know this site's key: send {kit.kit / 'site.pub'} (the public key, never "
            f"site.key) to the central host and ask them to put it in the server kit's site-keys/ as "
            f"{kit.site_name}.pub and run 'onfh server register --kit KIT' (also spelt 'onfh server --kit KIT "
            "--register-only'): the running server then accepts this site, no restart needed"
        )
    return None


class SiteDaemon:
    """Keeps one SuperNode connected: waits for the server, starts, watches, restarts."""

    def __init__(self, kit: SiteKit, config: str, runtime_port: int, log_path: Path) -> None:
        self.kit, self.config, self.runtime_port, self.log_path = kit, config, runtime_port, log_path
        self.proc: subprocess.Popen | None = None
        self.disconnected = False  # the SuperNode reported a failed connection attempt, not yet a success

    def wait_for_server(self, max_wait_s: float | None) -> None:
        """Block until the server answers TLS with a trusted certificate (SiteRefused / TimeoutError)."""
        started, delay = time.monotonic(), 1.0
        while (reason := check_server(self.kit.address, self.kit.kit / "ca.pem")) is not None:
            if max_wait_s is not None and time.monotonic() - started > max_wait_s:
                raise TimeoutError(
                    f"the server {self.kit.address} was unreachable for {max_wait_s:.0f} s ({reason})"
                )
            self._say(f"server {self.kit.address} unreachable ({reason}); retrying in {delay:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def run_once(self) -> None:
        """Start the SuperNode and relay its output until it exits; SiteRefused if it says why it cannot join."""
        flwr_home = self.log_path.parent / "flwr-home"
        self.proc = subprocess.Popen(
            supernode_command(self.kit, self.config, self.runtime_port),
            env=flwr_env(flwr_home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._say(f"SuperNode started for site {self.kit.site_name} -> {self.kit.address}")
        recent: deque[str] = deque(maxlen=60)
        relay = threading.Thread(target=self._relay, args=(self.proc, recent), daemon=True)
        relay.start()
        code = self.proc.wait()
        # The SuperNode's own children can outlive it and hold its output open: end them, then read the rest.
        stop_process_tree(self.proc)
        relay.join(timeout=10)
        refusal = refusal_from_output(list(recent), self.kit)
        if refusal is not None:
            raise refusal
        self._say(f"SuperNode exited with code {code}; the server went away, reconnecting")

    def _relay(self, proc: subprocess.Popen, recent: deque[str]) -> None:
        """Copy the SuperNode's output into the site log, keeping the last lines to explain an exit."""
        assert proc.stdout is not None
        with self.log_path.open("a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                recent.append(line.rstrip())
                self._note_connection(line)

    def _note_connection(self, line: str) -> None:
        """Say in plain words when the SuperNode loses the server and when it has it back."""
        if "Connection attempt failed" in line and not self.disconnected:
            self.disconnected = True
            self._say(
                "lost the connection to the server; the SuperNode retries by itself (the server counts "
                "this site out of a round after about a minute offline and asks it again once it is back)"
            )
        elif "Connection successful after" in line and self.disconnected:
            self.disconnected = False
            self._say("connection to the server is back")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_tree(self.proc)

    def _say(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} onfh site: {message}"
        print(line, flush=True)
        with self.log_path.open("a") as log:
            log.write(line + "\n")


def _settings(preset: Path | None) -> PreprocessSettings:
    if preset is None:
        return PreprocessSettings()
    return RunConfig.from_dict(tomllib.loads(preset.read_text())).preprocess


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onfh site",
        description=description(__doc__, full=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 stopped (SIGTERM / Ctrl-C), 2 bad arguments, 3 data unusable, "
        "4 server or kit refused",
    )
    parser.add_argument(
        "--kit", type=Path, required=True, help="this hospital's kit folder from 'onfh provision'"
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="the site's folder: DICOM export + labels.csv"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="preprocessed hips (default: .DATA-cache beside DATA)"
    )
    parser.add_argument("--device", default="auto", help="torch device for local training (auto, cpu, cuda)")
    parser.add_argument(
        "--runtime-port", type=int, default=9094, help="local port of the SuperNode's runtime API"
    )
    parser.add_argument(
        "--preset", type=Path, default=None, help="run preset whose preprocessing the check uses"
    )
    parser.add_argument("--log", type=Path, default=None, help="log file (default: CACHE/../onfh-site.log)")
    parser.add_argument(
        "--max-wait", type=float, default=None, help="give up after the server is down this long (s)"
    )
    parser.add_argument(
        "--auth-grace",
        type=float,
        default=120.0,
        help="seconds to retry while the server does not know the key",
    )
    parser.add_argument("--skip-check", action="store_true", help="join without checking the data first")
    return parser


def _stay_connected(daemon: SiteDaemon, max_wait_s: float | None, auth_grace_s: float) -> None:
    """Wait for the server, run the SuperNode, and again when it stops; returns only by an exception."""
    key_unknown_since: float | None = None
    while True:
        daemon.wait_for_server(max_wait_s)
        try:
            daemon.run_once()
            key_unknown_since = None
        except KeyUnknown as exc:
            # A server that has just started registers its keys a few seconds after it answers.
            key_unknown_since = key_unknown_since or time.monotonic()
            if time.monotonic() - key_unknown_since > auth_grace_s:
                raise
            daemon._say(f"{exc} (retrying for up to {auth_grace_s:.0f} s)")
        time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    """``onfh site --kit DIR --data DIR [--cache DIR] [--device auto] [--runtime-port 9094] [--preset TOML]``.

    Returns 0 when stopped (SIGTERM / Ctrl-C), 3 when the data is unusable, 4 when the server or
    the kit is refused, 2 on bad arguments.
    """
    args = _parser().parse_args(argv)
    data = args.data.absolute()
    cache = (args.cache or data.parent / f".{data.name}-cache").absolute()
    log_path = (args.log or cache.parent / f"onfh-site-{data.name}.log").absolute()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    daemon: SiteDaemon | None = None

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        kit = SiteKit.load(args.kit)
        if not args.skip_check:
            print(f"onfh site: checking {data} ...", flush=True)
            print(f"onfh site: data usable: {check_data(data, cache, _settings(args.preset))}", flush=True)
        config = node_config(kit.site_name, data, cache, args.device)
        daemon = SiteDaemon(kit, config, args.runtime_port, log_path)
        _stay_connected(daemon, args.max_wait, args.auth_grace)
    except KeyboardInterrupt:
        code, message = EXIT_STOPPED, "stopped"
    except SiteRefused as exc:
        code = EXIT_DATA_UNUSABLE if isinstance(exc, DataUnusable) else EXIT_REFUSED
        message = f"refused: {exc}"
    except TimeoutError as exc:
        code, message = EXIT_REFUSED, str(exc)
    except (ValueError, FileNotFoundError) as exc:
        code, message = EXIT_BAD_ARGS, str(exc)
    if daemon is not None:
        daemon.stop()  # before saying so: the SuperNode and what it started are gone
    print(f"onfh site: {message}", file=sys.stdout if code == EXIT_STOPPED else sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
