"""``onfh site approve|approved|revoke``: the releases (app bundle digests) this hospital agrees to run.

A run's app bundle (FAB) is executed at the site as the SuperNode's user, and Flower puts the
bundle first on ``sys.path``: its ``client/`` replaces the code the hospital installed. So a site
pins what it has reviewed: ``KIT/approved-releases.json`` lists the sha256 digests of the bundles it
accepts (with a note and the date), and the SuperNode gate (``client.supernode_gate``) refuses
every other bundle before a line of it runs.

A release's digest is the sha256 of the bundle Flower builds from the staged app
(``common.release.stage_app``), the very bytes ``onfh run submit`` sends; run settings travel
beside the bundle, so one release has one digest whatever the preset::

    onfh site approve --kit KIT --release /path/to/onfh-fl-1.2   # the release's source folder
    onfh site approve --kit KIT --fab refused-bundles/HEX.fab     # a bundle the gate refused
    onfh site approve --kit KIT --digest sha256:HEX --note "release 1.2, reviewed by IT"
    onfh site approved --kit KIT                                  # list
    onfh site revoke --kit KIT --digest sha256:HEX

An approval takes effect at the next run, without restarting ``onfh site``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from common.cli import description
from common.files import write_atomic
from common.release import PROJECT_ROOT, stage_app

APPROVED_FILE = "approved-releases.json"
DIGEST = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")


@dataclass(frozen=True)
class Approval:
    """One approved release: its bundle digest (``sha256:HEX``), a note, when, and what was digested."""

    digest: str
    note: str
    approved: str
    source: str


def approved_file(kit: Path) -> Path:
    """Where a site kit keeps its approvals: ``KIT/approved-releases.json``."""
    return kit.absolute() / APPROVED_FILE


def parse_digest(text: str) -> str:
    """``sha256:HEX`` or ``HEX`` (64 hex digits) -> ``sha256:hex``; ValueError saying what is expected."""
    found = DIGEST.match(text.strip().lower())
    if not found:
        raise ValueError(
            f"{text!r} is not a bundle digest: give 'sha256:' and 64 hex digits, as 'onfh site approve "
            "--release DIR' prints it or as the site log names a refused bundle"
        )
    return f"sha256:{found.group(1)}"


def fab_digest(content: bytes) -> str:
    """The digest of a bundle's bytes, as the SuperLink and the SuperNode name it (``sha256:HEX``)."""
    return f"sha256:{hashlib.sha256(content).hexdigest()}"


def release_digest(source: Path) -> str:
    """The digest of a release: of the bundle Flower builds from ``source`` staged as ``onfh run submit`` does.

    ``source`` is a release's folder (with its pyproject.toml) or a ``.fab`` file (its bytes).
    """
    if source.is_file():
        return fab_digest(source.read_bytes())
    if not (source / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"{source} is neither a release folder (no pyproject.toml) nor a .fab file: pass the folder of "
            "the onfh-fl release you reviewed, or a bundle file"
        )
    from flwr.cli.build import build_fab_from_disk  # Flower only when a bundle is built

    with tempfile.TemporaryDirectory(prefix="onfh-release-") as staging:
        return fab_digest(build_fab_from_disk(stage_app(source, Path(staging) / "app")))


def _check_ownership(path: Path) -> None:
    """Only the hospital's user (or root) may change the list: anyone else could approve their own code."""
    info = path.stat()
    if info.st_uid not in (os.getuid(), 0):
        raise ValueError(
            f"{path} belongs to another user (uid {info.st_uid}): only this site's user may approve"
        )
    if stat.S_IMODE(info.st_mode) & 0o022:
        raise ValueError(
            f"{path} can be changed by other users (mode {stat.S_IMODE(info.st_mode):o}): run 'chmod 644 {path}'"
        )


def load_approvals(path: Path) -> list[Approval]:
    """The approvals in ``path`` (none if it does not exist); ValueError naming the file if it cannot be trusted."""
    if not path.exists():
        return []
    _check_ownership(path)
    try:
        entries = json.loads(path.read_text())["approved"]
        return [
            Approval(
                parse_digest(e["digest"]),
                str(e.get("note", "")),
                str(e["approved"]),
                str(e.get("source", "")),
            )
            for e in entries
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path} is not a list of approved releases ({exc}): fix or delete it and approve again"
        ) from None


def approved_digests(path: Path) -> set[str]:
    """The digests (``sha256:HEX``) approved in ``path``."""
    return {a.digest for a in load_approvals(path)}


def _save(path: Path, approvals: list[Approval]) -> None:
    body = {"approved": [asdict(a) for a in approvals]}
    write_atomic(path, (json.dumps(body, indent=2) + "\n").encode(), mode=0o644)


def approve(path: Path, digest: str, note: str = "", source: str = "") -> Approval:
    """Add ``digest`` to the approvals in ``path`` (a re-approval updates the note and date); returns it."""
    digest = parse_digest(digest)
    approval = Approval(digest, note, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), source)
    _save(path, [a for a in load_approvals(path) if a.digest != digest] + [approval])
    return approval


def revoke(path: Path, digest: str) -> bool:
    """Remove ``digest`` from the approvals in ``path``; False when it was not approved."""
    digest = parse_digest(digest)
    approvals = load_approvals(path)
    kept = [a for a in approvals if a.digest != digest]
    if len(kept) == len(approvals):
        return False
    _save(path, kept)
    return True


def approve_command(kit: Path | None) -> str:
    """The command a hospital runs to approve the release it has installed (this project's folder)."""
    return f"onfh site approve --kit {kit or 'KIT'} --release {PROJECT_ROOT} --note 'reviewed by ...'"


def _parser(verb: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"onfh site {verb}", description=description(__doc__))
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--kit", type=Path, help="this hospital's kit folder (approvals in KIT/approved-releases.json)"
    )
    where.add_argument("--approved", type=Path, help="the approvals file, if not the kit's")
    if verb == "approve":
        what = parser.add_mutually_exclusive_group(required=True)
        what.add_argument("--release", type=Path, help="the release's source folder you reviewed")
        what.add_argument("--fab", type=Path, help="a bundle file (e.g. one the gate refused and saved)")
        what.add_argument("--digest", help="a digest given to you: sha256:HEX")
        parser.add_argument("--note", default="", help="who reviewed what, e.g. 'release 1.2, IT ticket 42'")
    elif verb == "revoke":
        parser.add_argument("--digest", required=True, help="the approved digest to remove: sha256:HEX")
    return parser


def main(verb: str, argv: list[str]) -> int:
    """``onfh site approve|approved|revoke --kit DIR ...``; 0 on success, 1 on a problem (said on stderr)."""
    args = _parser(verb).parse_args(argv)
    path = args.approved.absolute() if args.approved else approved_file(args.kit)
    try:
        if args.kit is not None and not args.kit.is_dir():
            raise FileNotFoundError(f"{args.kit} is not a folder: pass this hospital's kit folder")
        if verb == "approve":
            source = args.release or args.fab
            if source is not None and not source.exists():
                raise FileNotFoundError(f"{source} does not exist")
            digest = release_digest(source) if source is not None else parse_digest(args.digest)
            approve(path, digest, args.note, str(source.absolute()) if source is not None else "digest given")
            print(f"approved {digest} in {path}; it takes effect at the next run (no restart needed)")
        elif verb == "revoke":
            done = revoke(path, args.digest)
            print(
                f"revoked {parse_digest(args.digest)} in {path}"
                if done
                else f"{args.digest} was not approved"
            )
            return 0 if done else 1
        else:
            approvals = load_approvals(path)
            for a in approvals:
                print(f"{a.digest}  approved {a.approved}  {a.note or '-'}  ({a.source})")
            if not approvals:
                print(f"no approved release in {path}: {approve_command(args.kit)}")
    except (OSError, ValueError) as exc:
        print(f"onfh site {verb}: {exc}", file=sys.stderr)
        return 1
    return 0
