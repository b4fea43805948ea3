"""``onfh site --kit DIR --data DIR``: a hospital's daemon around ``flower-supernode``.

1. Refuses to start while no release is approved (``onfh site approve``, see ``client.approval``)
   and prints the digests it will run.
2. Checks the site's data (as ``onfh check``) and refuses to join with nothing usable.
3. Checks the server before dialling it: a TLS handshake verified against the kit's CA and the
   server's name. A server that is down is waited for; a certificate that is expired, signed by
   another CA, or for another name, and a server without TLS, are refused with what to do.
4. Starts ``flower-supernode`` through the gate (``client.supernode_gate``), which runs only
   approved app bundles, with the CA, the site's private key and the node config (``data-dir``,
   ``site-name``, ``cache-dir``, ``device``, ``policy-file``), telemetry and update checks off.
   If the SuperNode stops because the server went away, the daemon waits for the server and
   starts it again; a key the server does not know is refused with what to send to the central host.

The cache, the log and the SuperNode's files default to ``$XDG_CACHE_HOME/onfh/SITE`` (mode 0700).
Other verbs: ``onfh site approve|approved|revoke`` (approvals), ``onfh site keygen`` (site keys),
``onfh site audit`` (what the site has sent: its egress ledger, ``client.audit``).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections import deque
from pathlib import Path

from client import approval
from client.site_kit import (
    DataUnusable,
    KeyUnknown,
    SiteKit,
    SiteRefused,
    check_data,
    check_server,
    node_config,
    site_home,
)
from common.cli import description
from common.config import RunConfig
from common.deployment import flwr_env, stop_process_tree
from common.sitedata.settings import PreprocessSettings

__all__ = [
    "DataUnusable",
    "KeyUnknown",
    "SiteKit",
    "SiteRefused",
    "check_data",
    "check_server",
    "node_config",
]

EXIT_STOPPED = 0
EXIT_BAD_ARGS = 2
EXIT_DATA_UNUSABLE = 3
EXIT_REFUSED = 4
RETRY_MAX_S = 30.0
VERBS = ("approve", "approved", "revoke")  # approvals (client.approval); "keygen": client.keygen


def supernode_command(
    kit: SiteKit, config: str, runtime_port: int, approved: Path, refused_dir: Path | None = None
) -> list[str]:
    """The SuperNode's command line: ``flower-supernode`` behind the approval gate, TLS with the kit's CA,
    the site key, the node config."""
    # -P: the current folder is not put on sys.path, so no stray client/ beside it is imported.
    gate = [sys.executable, "-P", "-m", "client.supernode_gate", "--approved", str(approved)]
    if refused_dir is not None:
        gate += ["--refused-dir", str(refused_dir)]
    return [
        *gate, "--",
        "--superlink", kit.address,
        "--root-certificates", str(kit.kit / "ca.pem"),
        "--auth-supernode-private-key", str(kit.kit / "site.key"),
        "--node-config", config,
        "--port", str(runtime_port),
    ]  # fmt: skip


def pinned_releases(kit: SiteKit, approved: Path) -> list[approval.Approval]:
    """The approved releases, or SiteRefused with the command to approve one."""
    try:
        approvals = approval.load_approvals(approved)
    except ValueError as exc:
        raise SiteRefused(str(exc)) from None
    if not approvals:
        raise SiteRefused(
            f"no release is approved in {approved}: this site runs only app bundles it has approved. Review the "
            f"release installed here and approve it: {approval.approve_command(kit.kit)}"
        )
    return approvals


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
    if "onfh gate: cannot guard" in text:
        return SiteRefused(
            "the approval gate does not fit the installed Flower version; install the Flower version this "
            f"release pins (pip install -e . in its folder): {text.split('onfh gate: ', 1)[1][:300]}"
        )
    if "address already in use" in text:
        return SiteRefused(
            "the SuperNode's local runtime port is taken by another program: pass --runtime-port with a free port"
        )
    if "Failed to activate SuperNode" in text:
        return KeyUnknown(
            f"the server does not know this site's key: send {kit.kit / 'site.pub'} (the public key, never "
            f"site.key) to the federation's provisioner ('onfh provision OUT --add-site {kit.site_name}=site.pub') "
            "and ask the central host to run 'onfh server register --kit KIT': the running server then accepts "
            "this site, no restart needed (a revoked site is never accepted again)"
        )
    return None


class SiteDaemon:
    """Keeps one SuperNode connected: waits for the server, starts, watches, restarts."""

    def __init__(self, kit: SiteKit, config: str, runtime_port: int, log_path: Path, approved: Path) -> None:
        self.kit, self.config, self.runtime_port, self.log_path = kit, config, runtime_port, log_path
        self.approved = approved
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
            supernode_command(
                self.kit,
                self.config,
                self.runtime_port,
                self.approved,
                self.log_path.parent / "refused-bundles",
            ),
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
        elif "is not an approved release" in line or "cannot be checked" in line:
            self._say(line[line.find("refused run") :].rstrip())

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
        "4 server, kit or release refused. Other verbs: onfh site approve|approved|revoke|keygen|audit --help",
    )
    parser.add_argument(
        "--kit", type=Path, required=True, help="this hospital's kit folder from 'onfh provision'"
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="the site's folder: DICOM export + labels.csv"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="preprocessed hips (default: ~/.cache/onfh/SITE/cache)"
    )
    parser.add_argument("--device", default="auto", help="torch device for local training (auto, cpu, cuda)")
    parser.add_argument(
        "--runtime-port", type=int, default=9094, help="local port of the SuperNode's runtime API"
    )
    parser.add_argument(
        "--preset", type=Path, default=None, help="run preset whose preprocessing the check uses"
    )
    parser.add_argument(
        "--log", type=Path, default=None, help="log file (default: ~/.cache/onfh/SITE/onfh-site.log)"
    )
    parser.add_argument(
        "--approved", type=Path, default=None, help="approved releases (default: KIT/approved-releases.json)"
    )
    parser.add_argument(
        "--policy", type=Path, default=None, help="the site's policy file (node config policy-file)"
    )
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


def _keygen(argv: list[str]) -> int:
    """``onfh site keygen ...``: the site's keys (``client.keygen``), imported only when asked for."""
    try:
        from client import keygen
    except ModuleNotFoundError as exc:
        if exc.name != "client.keygen":
            raise
        print("onfh site keygen: not part of this installation (client/keygen.py missing)", file=sys.stderr)
        return EXIT_BAD_ARGS
    return int(keygen.main(argv) or 0)


def _prepare(args: argparse.Namespace) -> SiteDaemon:
    """Kit, approvals, data, paths: everything before the first connection; SiteRefused / ValueError."""
    kit = SiteKit.load(args.kit)
    approved = (args.approved or approval.approved_file(kit.kit)).absolute()
    pinned = pinned_releases(kit, approved)
    print(f"onfh site: runs only these approved releases ({approved}):", flush=True)
    for release in pinned:
        print(f"onfh site:   {release.digest}  approved {release.approved}  {release.note}", flush=True)
    data = args.data.absolute()
    home = site_home(kit.site_name) if args.cache is None or args.log is None else None
    cache = (args.cache or home / "cache").absolute()
    log_path = (args.log or home / "onfh-site.log").absolute()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if args.policy is not None and not args.policy.is_file():
        raise FileNotFoundError(
            f"policy file {args.policy} not found: pass the site's policy file or leave --policy out"
        )
    if not args.skip_check:
        print(f"onfh site: checking {data} ...", flush=True)
        print(f"onfh site: data usable: {check_data(data, cache, _settings(args.preset))}", flush=True)
    config = node_config(kit.site_name, data, cache, args.device, args.policy)
    return SiteDaemon(kit, config, args.runtime_port, log_path, approved)


def main(argv: list[str] | None = None) -> int:
    """``onfh site [start] --kit DIR --data DIR [--cache DIR] [--device auto] [--runtime-port 9094] [--preset TOML]
    [--policy FILE] [--approved FILE]``; ``onfh site approve|approved|revoke|keygen|audit ...``.

    Returns 0 when stopped (SIGTERM / Ctrl-C), 3 when the data is unusable, 4 when the server,
    the kit or the release is refused, 2 on bad arguments.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in VERBS:
        return approval.main(argv[0], argv[1:])
    if argv and argv[0] == "keygen":
        return _keygen(argv[1:])
    if argv and argv[0] == "audit":
        from client import audit  # what this site has sent (its egress ledger)

        return audit.main(argv[1:])
    args = _parser().parse_args(argv[1:] if argv and argv[0] == "start" else argv)
    daemon: SiteDaemon | None = None

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        daemon = _prepare(args)
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
