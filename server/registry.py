"""Which sites the SuperLink admits: registering site keys, revoking a site for good, the audit trail.

These are acts of the central host's administrator on the central host itself: they reach the
SuperLink directly on loopback (``WORK/flwr-home``), never through the public doors. Every act is
appended to ``WORK/audit.jsonl`` beside the front's own lines.

Revoking a site unregisters its node (the SuperLink then refuses its key), moves its key from the
server kit's ``site-keys/`` to ``revoked/`` (the front refuses Fleet requests signed by it, and
``register`` refuses to register it again), and is final: a revoked site cannot register a new
key itself, because registering needs the Control API, which only admins reach. Only the
provisioner can issue the hospital a new kit (``onfh provision --add-site``) under a new name.
"""

from __future__ import annotations

import getpass
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from common.deployment import flwr_env, flwr_executable
from common.files import write_atomic
from server.front import AuditLog
from server.runs import CONNECTION


def flwr_local(work: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """``flwr ARGS`` against the SuperLink's loopback Control API (the central host's own connection)."""
    return subprocess.run(
        [flwr_executable(), *args],
        env=flwr_env(work / "flwr-home"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def control_api_answers(work: Path) -> bool:
    """True when ``flwr supernode ls`` reaches the SuperLink's Control API on loopback."""
    try:
        done = flwr_local(work, "supernode", "ls", CONNECTION, "--format", "json")
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and '"success": true' in done.stdout


def audit(work: Path, **record: Any) -> None:
    """One line in the audit log, by the local user who ran the command."""
    AuditLog(work / "audit.jsonl").write(door="central host", who=getpass.getuser(), **record)


def _fingerprint(path: Path) -> bytes:
    key = serialization.load_ssh_public_key(path.read_bytes())
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _nodes_file(work: Path) -> Path:
    return work / "nodes.json"


def registered_nodes(work: Path) -> dict[str, int]:
    """Site name -> node id, as recorded when each key was registered."""
    path = _nodes_file(work)
    return {k: int(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def register_site_keys(site_keys: dict[str, Path], revoked: Path, work: Path) -> dict[str, str]:
    """Register every key of ``site_keys`` (name -> OpenSSH public key) with the running SuperLink.

    A site or key found in ``revoked/`` is refused (RuntimeError): a revocation is final. Returns
    site -> ``registered (node ID)`` or ``already registered``; node ids are kept in WORK/nodes.json.
    """
    banned = {p.stem: _fingerprint(p) for p in sorted(revoked.glob("*.pub"))} if revoked.is_dir() else {}
    for site, key in site_keys.items():
        if site in banned or _fingerprint(key) in banned.values():
            raise RuntimeError(
                f"site {site} ({key}) was revoked: its key and name stay refused. A hospital that is to "
                "take part again needs a new kit from the provisioner under a new name"
            )
    status: dict[str, str] = {}
    nodes = registered_nodes(work)
    for site, key in site_keys.items():
        done = flwr_local(work, "supernode", "register", str(key), CONNECTION, "--name", site)
        text = done.stdout + done.stderr
        if done.returncode == 0:
            node = re.search(r"SuperNode (\d+) registered", text)
            status[site] = f"registered (node {node.group(1)})" if node else "registered"
            if node:
                nodes[site] = int(node.group(1))
            audit(work, action="register", site=site, node=nodes.get(site))
        elif "already in use" in text:
            status[site] = "already registered"
        else:
            raise RuntimeError(f"registering {key} failed: {text.strip()[-600:]}")
    write_atomic(_nodes_file(work), json.dumps(nodes, indent=1).encode(), mode=0o600)
    return status


def revoke_site(site: str, site_keys: Path, revoked: Path, work: Path) -> str:
    """Unregister ``site``'s node and move its key to ``revoked/``; what was done, in words."""
    key = site_keys / f"{site}.pub"
    if not key.is_file():
        if (revoked / f"{site}.pub").is_file():
            return f"site {site} was already revoked"
        raise RuntimeError(f"no key for site {site} in {site_keys}: check the name ('ls {site_keys}')")
    node = registered_nodes(work).get(site)
    said = "its key was not registered with this server"
    if node is not None:
        done = flwr_local(work, "supernode", "unregister", str(node), CONNECTION, "--format", "json")
        if done.returncode != 0 and "already deleted" not in done.stdout + done.stderr:
            raise RuntimeError(
                f"unregistering node {node} failed: {(done.stdout + done.stderr).strip()[-600:]}"
            )
        said = f"node {node} unregistered"
    revoked.mkdir(mode=0o700, exist_ok=True)
    key.rename(revoked / key.name)
    audit(work, action="revoke", site=site, node=node)
    return f"site {site} revoked: {said}; its key moved to {revoked}; it cannot register again"
