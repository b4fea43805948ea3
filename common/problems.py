"""Problems found while reading a site's data: one line each, naming the file and the fix."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

SEVERITIES: tuple[str, ...] = ("error", "warning", "info")


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or worth knowing) about a site's data.

    Attributes:
        path: file or ``labels.csv:LINE``, relative to the site folder. The only place a
            problem may carry an identifier (folder names chosen by the hospital).
        reason: what is wrong, without patient identifiers.
        fix: what the hospital can do about it.
        severity: ``"error"`` (the check fails), ``"warning"`` (data skipped or suspicious)
            or ``"info"`` (expected, e.g. a non-DICOM file ignored).
    """

    path: str
    reason: str
    fix: str
    severity: str = "warning"

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Problem severity must be one of {SEVERITIES}, got {self.severity!r}")

    def __str__(self) -> str:
        return f"{self.path}: {self.reason} -> {self.fix}"


class ProblemLog(list):
    """An ordered list of :class:`Problem` with helpers to add and summarise them."""

    def add(self, path: str, reason: str, fix: str, severity: str = "warning") -> Problem:
        """Record a problem and return it."""
        problem = Problem(str(path), reason, fix, severity)
        self.append(problem)
        return problem

    def with_severity(self, severity: str) -> list[Problem]:
        """The problems of one severity, in the order they were added."""
        return [p for p in self if p.severity == severity]

    @property
    def errors(self) -> list[Problem]:
        return self.with_severity("error")

    @property
    def warnings(self) -> list[Problem]:
        return self.with_severity("warning")

    def counts(self) -> dict[str, int]:
        """Number of problems per severity (all severities present, zero if none)."""
        found = Counter(p.severity for p in self)
        return {s: found.get(s, 0) for s in SEVERITIES}

    def lines(self, min_severity: str = "info") -> list[str]:
        """One ``SEVERITY path: reason -> fix`` line per problem at or above ``min_severity``."""
        keep = SEVERITIES[: SEVERITIES.index(min_severity) + 1]
        return [f"{p.severity.upper():7s} {p}" for p in self if p.severity in keep]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line problems."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
