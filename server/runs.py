"""``onfh run submit|status|logs``: the admin's side, wrapping ``flwr run``, ``flwr ls`` and ``flwr log``.

The admin kit (``admin.json`` + ``ca.pem``) says where the SuperLink is; this module writes the
Flower config ``flwr`` reads (``$FLWR_HOME/config.toml``, FLWR_HOME inside the kit, never the
user's ``~/.flwr``) with the CA's absolute path, so a kit can be moved.

``submit`` stages the app before ``flwr run`` builds its bundle (FAB): only the Python code of
the project's packages and a generated pyproject.toml whose ``[tool.flwr.app.config]`` lists
every run setting (so any preset key is accepted by the SuperLink). Nothing else of the working
folder, least of all a kit or a key, can end up in the bundle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.cli import description
from common.config import RunConfig
from common.deployment import flwr_env, flwr_executable, split_address
from common.release import PROJECT_ROOT, stage_app, toml_value
from server.front import LocalRelay

CONNECTION = "onfh"  # the connection's name in the generated Flower config
FINISHED = "finished"


def write_flwr_connection(flwr_home: Path, address: str, ca_pem: Path | None) -> Path:
    """Write ``flwr_home/config.toml`` with one default connection to ``address``; returns its path.

    TLS verified against ``ca_pem``; without one, plain HTTP (only ever to the admin's own loopback relay).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = flwr_home / "config.toml"
    security = (
        f"root-certificates = {json.dumps(str(ca_pem.absolute()))}\n" if ca_pem else "insecure = true\n"
    )
    config.write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f"address = {json.dumps(address)}\n" + security
    )
    return config


class AdminKit:
    """An admin kit folder: ``admin.json`` (addresses), ``ca.pem``, ``admin.pem`` and ``admin.key``.

    Every ``flwr`` command goes through a relay on this machine's loopback that presents the
    admin certificate to the server's admin door (Flower's CLI cannot present one itself).
    """

    FILES = ("admin.json", "ca.pem", "admin.pem", "admin.key")

    def __init__(self, kit: Path) -> None:
        missing = [n for n in self.FILES if not (kit / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{kit} is not a complete admin kit ({', '.join(missing)} missing): 'onfh run keygen --kit "
                f"{kit}' makes admin.key and admin.csr here; the provisioner returns admin.pem, ca.pem and "
                "admin.json for the CSR; copy them into this folder"
            )
        self.kit = kit
        settings = json.loads((kit / "admin.json").read_text())
        self.address = str(settings["server-address"])
        host, port = split_address(self.address)
        self.admin_address = str(settings.get("admin-address", f"{host}:{port + 1}"))
        self.flwr_home = kit / "flwr-home"

    @contextlib.contextmanager
    def connected(self) -> Iterator[None]:
        """While open, ``flwr`` with this kit's FLWR_HOME reaches the server through the relay."""
        relay = LocalRelay(
            self.admin_address, self.kit / "ca.pem", self.kit / "admin.pem", self.kit / "admin.key"
        )
        with relay as local:
            write_flwr_connection(self.flwr_home, local, None)
            yield

    def flwr(self, *args: str, timeout: float | None = 120.0) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` against this kit's server (through the relay); output captured as text."""
        with self.connected():
            return subprocess.run(
                [flwr_executable(), *args],
                env=flwr_env(self.flwr_home),
                capture_output=True,
                text=True,
                timeout=timeout,
            )


def merged_run_config(presets: list[Path], overrides: list[str]) -> dict[str, Any]:
    """Presets (TOML files, later ones win) then overrides (``"k=v k2=v2"``), checked by ``RunConfig``.

    An unknown or invalid setting is refused here, with its name, before anything reaches the server.
    """
    merged: dict[str, Any] = {}
    for preset in presets:
        if not preset.is_file():
            raise FileNotFoundError(f"preset {preset} not found: pass a TOML file such as presets/tiny.toml")
        merged.update(tomllib.loads(preset.read_text()))
    for item in overrides:
        try:
            merged.update(tomllib.loads(item.replace(" ", "\n")))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--config {item!r} is not 'key=value' pairs with TOML values ({exc})") from None
    RunConfig.from_dict(merged)
    return merged


def submit(kit: AdminKit, presets: list[Path], overrides: list[str], app: Path = PROJECT_ROOT) -> int:
    """Submit the app with ``presets`` (TOML files) and ``overrides`` (``"k=v k2=v2"``); returns the run id."""
    run_config = merged_run_config(presets, overrides)
    with tempfile.TemporaryDirectory(prefix="onfh-app-") as staging:
        staged = stage_app(app, Path(staging) / "app")
        config_file = Path(staging) / "run-config.toml"  # beside the app, not in its bundle
        config_file.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
        args = ["run", str(staged), CONNECTION, "--format", "json", "--run-config", str(config_file)]
        done = kit.flwr(*args, timeout=300)
    reply = _json_reply(done, "flwr run")
    return int(reply["run-id"])


def _json_reply(done: subprocess.CompletedProcess, what: str) -> dict:
    """The JSON object ``flwr ... --format json`` printed; a RuntimeError with Flower's message otherwise."""
    text = done.stdout.strip()
    start = text.find("{")
    reply: dict = {}
    if start >= 0:
        try:
            reply = json.loads(text[start:])
        except json.JSONDecodeError:
            reply = {}
    if done.returncode != 0 or not reply.get("success", False):
        message = reply.get("error-message") or (done.stderr.strip() or text)[-2000:]
        raise RuntimeError(f"{what} failed: {message}")
    return reply


def runs(kit: AdminKit, run_id: int | None = None) -> list[dict]:
    """The SuperLink's runs (``flwr ls --format json``): dicts with run-id, status, elapsed..."""
    args = ["ls", CONNECTION, "--format", "json"] + (["--run-id", str(run_id)] if run_id is not None else [])
    return list(_json_reply(kit.flwr(*args), "flwr ls").get("runs", []))


def wait_finished(
    kit: AdminKit, run_id: int, timeout_s: float, poll_s: float = 2.0, max_poll_s: float = 15.0
) -> dict:
    """Poll ``flwr ls`` until run ``run_id`` is finished (any sub-status); returns its entry.

    Each ``flwr ls`` costs a few CPU seconds (a fresh Flower CLI), so the interval grows from
    ``poll_s`` to ``max_poll_s``: a run of minutes is not slowed by the watching of it."""
    deadline = time.monotonic() + timeout_s
    while True:
        entry = runs(kit, run_id)[0]
        if str(entry.get("status", "")).startswith(FINISHED):
            return entry
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} is still {entry.get('status')} after {timeout_s:.0f} s")
        time.sleep(poll_s)
        poll_s = min(max_poll_s, poll_s * 1.5)


def logs(kit: AdminKit, run_id: int, follow: bool = False) -> str:
    """The run's logs (``flwr log --show``), or stream them to stdout until the run ends (``follow``)."""
    if follow:
        with kit.connected():
            subprocess.run(
                [flwr_executable(), "log", str(run_id), CONNECTION, "--stream"], env=flwr_env(kit.flwr_home)
            )
        return ""
    done = kit.flwr("log", str(run_id), CONNECTION, "--show")
    if done.returncode != 0:
        raise RuntimeError(f"flwr log failed: {(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    """``onfh run submit|status|logs|stop --kit ADMIN_KIT ...`` or ``onfh run keygen --kit DIR --name NAME``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keygen"]:  # the admin's key and CSR, made on the admin's own machine
        from server.admin_keys import main as keygen

        return keygen(argv[1:])
    parser = argparse.ArgumentParser(prog="onfh run", description=description(__doc__))
    verbs = parser.add_subparsers(dest="verb", required=True)
    sub = verbs.add_parser("submit", help="submit a federated run (phase presets as run config)")
    sub.add_argument("--kit", type=Path, required=True, help="the admin kit folder")
    sub.add_argument("--preset", type=Path, action="append", default=[], help="run-config TOML (repeatable)")
    sub.add_argument("--config", action="append", default=[], help="overrides: \"run-name='x' seed=1\"")
    sub.add_argument("--app", type=Path, default=PROJECT_ROOT, help="the app folder (default: this project)")
    sub.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="then wait for the run to end")
    st = verbs.add_parser("status", help="list runs, or one run")
    st.add_argument("--kit", type=Path, required=True, help="the admin kit folder")
    st.add_argument("--run-id", type=int, default=None)
    st.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait for --run-id to finish")
    lg = verbs.add_parser("logs", help="show (or --follow) a run's logs")
    lg.add_argument("--kit", type=Path, required=True, help="the admin kit folder")
    lg.add_argument("run_id", type=int)
    lg.add_argument("--follow", action="store_true", help="stream until the run ends")
    sp = verbs.add_parser("stop", help="stop a run")
    sp.add_argument("--kit", type=Path, required=True, help="the admin kit folder")
    sp.add_argument("run_id", type=int)
    verbs.add_parser("keygen", help="make this admin's key and certificate request (--kit DIR --name NAME)")
    args = parser.parse_args(argv)
    try:
        kit = AdminKit(args.kit)
        if args.verb == "submit":
            run_id = submit(kit, args.preset, args.config, args.app)
            print(f"submitted run {run_id} to {kit.address}")
            if args.wait:
                print(json.dumps(wait_finished(kit, run_id, args.wait), indent=2))
        elif args.verb == "status":
            if args.wait and args.run_id is not None:
                print(json.dumps(wait_finished(kit, args.run_id, args.wait), indent=2))
            else:
                for entry in runs(kit, args.run_id):
                    print(
                        f"run {entry.get('run-id')}  {entry.get('status'):<22} elapsed {entry.get('elapsed')}  "
                        f"{entry.get('app', '')}"
                    )
        elif args.verb == "stop":
            _json_reply(kit.flwr("stop", str(args.run_id), CONNECTION, "--format", "json"), "flwr stop")
            print(f"stopped run {args.run_id}")
        else:
            print(logs(kit, args.run_id, args.follow), end="")
    except (FileNotFoundError, ValueError, RuntimeError, TimeoutError) as exc:
        print(f"onfh run {args.verb}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
