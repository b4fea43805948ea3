"""What keeps patient identifiers out of the cache: the salt, pseudonymous keys, and paths as tokens."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from common.files import write_atomic
from common.problems import Problem

KEY_LENGTH = 16  # hex characters of a patient key
SALT_FILE = "pseudonym.salt"
_TOKEN = re.compile(r"@path:([0-9a-f]{16})")
_PATH_LIKE = re.compile(r"[^\s()\[\]'\",;]+")  # fragments of problem text that may be a path


def site_salt(cache_dir: Path) -> bytes:
    """The site's pseudonym salt, kept in its cache folder (made on first use, readable by the owner only)."""
    path = cache_dir / SALT_FILE
    if not path.exists():
        write_atomic(path, secrets.token_bytes(32), mode=0o600)
    return path.read_bytes()


def patient_key(patient_id: str, salt: bytes) -> str:
    """Pseudonym of a patient, stable within a site (same salt), meaningless outside it."""
    return hashlib.sha256(salt + patient_id.encode()).hexdigest()[:KEY_LENGTH]


def split_id(patient_id: str) -> str:
    """What the train/val/test split hashes: the same on every install (unlike the salted key),
    so that a fresh cache, a second machine or a rebuilt site draws the same test patients.
    Kept in the site's cache only, beside the images; never sent."""
    return hashlib.sha256(b"onfh-split|" + patient_id.encode()).hexdigest()[:KEY_LENGTH]


class SiteFiles:
    """One walk of the site folder: file stats (for the cache's fingerprints), and path <-> token.

    Tokens (``@path:<16 hex>``, a salted hash of the relative path) stand for files and folders in
    cached problem text, since folder names often carry patient IDs, dates or accession numbers.
    """

    def __init__(self, site_dir: Path, salt: bytes) -> None:
        self.site_dir = site_dir
        self.salt = salt
        self.stats: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
        self._token_of: dict[str, str] = {}
        self._path_of: dict[str, str] = {}
        for root, dirs, names in os.walk(site_dir):
            dirs.sort()
            rel_root = Path(root).relative_to(site_dir).as_posix()
            if rel_root != ".":
                self._register(rel_root)
            for name in sorted(names):
                rel = name if rel_root == "." else f"{rel_root}/{name}"
                try:
                    stat = (Path(root) / name).stat()
                except OSError:  # a dangling link or a file removed meanwhile: scanning reports it
                    continue
                self.stats[rel] = (stat.st_size, stat.st_mtime_ns)
                self._register(rel)

    def _register(self, rel: str) -> None:
        token = hashlib.sha256(self.salt + b"path:" + rel.encode()).hexdigest()[:16]
        self._token_of[rel] = f"@path:{token}"
        self._path_of[token] = rel

    def rel(self, path: Path | str) -> str:
        """``path`` relative to the site folder (as given when outside it)."""
        try:
            return Path(path).relative_to(self.site_dir).as_posix()
        except ValueError:
            return Path(path).as_posix()

    def hide(self, text: str, identifiers: Iterable[str] = ()) -> str:
        """Replace paths of the site in ``text`` by tokens, and any identifier left by a mark."""
        if text in self._token_of:
            return self._token_of[text]
        text = text.replace(f"{self.site_dir.as_posix()}/", "")
        text = _PATH_LIKE.sub(self._token_for_fragment, text)
        for identifier in identifiers:
            if identifier:
                text = text.replace(identifier, "[patient id]")
        return text

    def _token_for_fragment(self, match: re.Match[str]) -> str:
        fragment = match.group(0)
        bare = fragment.rstrip(".:")  # a path ending a sentence
        if bare in self._token_of:
            return self._token_of[bare] + fragment[len(bare) :]
        return fragment

    def show(self, text: str) -> str:
        """Inverse of :meth:`hide` for paths still in the folder."""
        return _TOKEN.sub(lambda m: self._path_of.get(m.group(1), "(a file no longer in the folder)"), text)

    def hide_problem(self, problem: Problem, identifiers: Iterable[str] = ()) -> dict:
        """A problem as cached: its paths as tokens, any identifier left marked."""
        identifiers = tuple(identifiers)
        return {
            "path": self.hide(problem.path, identifiers),
            "reason": self.hide(problem.reason, identifiers),
            "fix": self.hide(problem.fix, identifiers),
            "severity": problem.severity,
        }

    def show_problem(self, cached: dict) -> Problem:
        """Inverse of :meth:`hide_problem`."""
        return Problem(
            self.show(cached["path"]),
            self.show(cached["reason"]),
            self.show(cached["fix"]),
            cached["severity"],
        )
