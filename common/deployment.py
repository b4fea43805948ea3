"""Process and kit helpers that the site daemon and the server's commands share (plain Python, no Flower).

Finding Flower's executables beside this interpreter, the environment a Flower process runs in,
parsing ``HOST:PORT``, and stopping a process with everything it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_GRACE_S = 15.0


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port); a message naming the fix otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"server address {address!r} is not HOST:PORT: give the name or IP the hospitals will "
            "dial and the port, e.g. --server-address fl.example-hospital.org:9092"
        )
    return host, int(port)


def flower_executable(name: str) -> str:
    """A Flower command (``flower-superlink``, ``flower-supernode``) beside this interpreter."""
    beside = Path(sys.executable).parent / name
    if not beside.exists():
        raise FileNotFoundError(
            f"{name} not found beside {sys.executable}: install onfh-fl in this environment"
        )
    return str(beside)


def flwr_executable() -> str:
    """The ``flwr`` beside this interpreter (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "flwr"
    found = str(beside) if beside.exists() else shutil.which("flwr")
    if not found:
        raise FileNotFoundError("the 'flwr' command is not installed: install onfh-fl (pip install -e .)")
    return found


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """The environment for a ``flwr``/Flower process: our FLWR_HOME, the venv first on PATH, no installs,
    no telemetry, no update check."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home.absolute())
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # Nothing phones home from a hospital or the central host: no telemetry, no update check.
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), children first; Flower detaches some of them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_process_tree(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int | None:
    """SIGTERM ``proc`` (it stops its own children), wait ``grace_s``, then SIGKILL whatever of its tree is left.

    ``proc`` must have been started with ``start_new_session=True``: what is left of its process
    group (children orphaned when it exited) is killed too. Returns the exit code of ``proc``.
    """
    if proc.poll() is None:
        tree = descendants(proc.pid)
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    else:
        tree = descendants(proc.pid)
    deadline = time.monotonic() + 3.0
    for pid in tree:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session's leftovers; the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
