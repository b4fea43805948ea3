"""Site-configurable rules that map a series (description, orientation, modality) to a protocol key."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ORIENTATIONS: tuple[str, ...] = ("AX", "COR", "SAG")

# The default rules, in the same TOML format a site writes in its ``protocols.toml``
# (docs/site-data.md shows this text). Regexes are searched case-insensitively in the
# SeriesDescription; ``(?<![a-z0-9])`` / ``(?![a-z0-9])`` make a token stand alone so that
# "t1_tse_cor", "T1W_TSE_COR" and "COR T1" match while "t10" does not.
DEFAULT_RULES_TOML = r"""
# Series whose description matches `ignore` are never used (localisers, calibration scans).
ignore = '(?<![a-z0-9])(loc|localizer|localiser|survey|scout|3[ _-]?plane|tri[ _-]?pilot|calibration|cal|ref|refscan)(?![a-z0-9])'

# Rules are tried in order; the first whose `description` regex matches (and whose
# `orientation`, if given, equals the orientation read from ImageOrientationPatient, and whose
# `exclude` regex does not match) gives the series its protocol key.

[[rule]]
key = "T1_COR"
description = '(?<![a-z0-9])t1w?(?![a-z0-9])'
orientation = "COR"
exclude = '(?<![a-z0-9])(fs|fatsat|spair|spir|stir|tirm|dixon|post|gd|contrast|c\+|\+c|sub|w|f|ip|in|op|opp|water|fat)(?![a-z0-9])'

[[rule]]
key = "T2W_COR"
description = 'dixon.*(?<![a-z0-9])(w|water)(?![a-z0-9])|(?<![a-z0-9])(w|water)(?![a-z0-9]).*dixon'
orientation = "COR"
exclude = '(?<![a-z0-9])(t1w?|pdw?)(?![a-z0-9])'

[[rule]]
key = "T2W_COR"
description = '(?<![a-z0-9])t2w?(?![a-z0-9]).*(?<![a-z0-9])(fs|fatsat|spair|spir|chess)(?![a-z0-9])|(?<![a-z0-9])(fs|fatsat|spair|spir|chess)(?![a-z0-9]).*(?<![a-z0-9])t2w?(?![a-z0-9])|(?<![a-z0-9])(stir|tirm)(?![a-z0-9])'
orientation = "COR"
exclude = 'dixon'

[[rule]]
key = "T1_AX"
description = '(?<![a-z0-9])t1w?(?![a-z0-9])'
orientation = "AX"
exclude = '(?<![a-z0-9])(fs|fatsat|spair|spir|stir|tirm|dixon|post|gd|contrast|c\+|\+c|sub|w|f|ip|in|op|opp|water|fat)(?![a-z0-9])'

[[rule]]
key = "T2W_AX"
description = 'dixon.*(?<![a-z0-9])(w|water)(?![a-z0-9])|(?<![a-z0-9])(w|water)(?![a-z0-9]).*dixon'
orientation = "AX"
exclude = '(?<![a-z0-9])(t1w?|pdw?)(?![a-z0-9])'

[[rule]]
key = "T2W_AX"
description = '(?<![a-z0-9])t2w?(?![a-z0-9]).*(?<![a-z0-9])(fs|fatsat|spair|spir|chess)(?![a-z0-9])|(?<![a-z0-9])(fs|fatsat|spair|spir|chess)(?![a-z0-9]).*(?<![a-z0-9])t2w?(?![a-z0-9])|(?<![a-z0-9])(stir|tirm)(?![a-z0-9])'
orientation = "AX"
exclude = 'dixon'

[[rule]]
key = "PDFS_SAG"
description = '(?<![a-z0-9])(pdw?|proton[ _-]?density)(?![a-z0-9]).*(?<![a-z0-9])(fs|fatsat|spair|spir|chess)(?![a-z0-9])|(?<![a-z0-9])(fs|fatsat|spair|spir|chess)(?![a-z0-9]).*(?<![a-z0-9])(pdw?|proton[ _-]?density)(?![a-z0-9])'
orientation = "SAG"
"""


class ProtocolRulesError(ValueError):
    """A ``protocols.toml`` that cannot be used; the message names the file, the entry and the fix."""

    def __init__(self, source: str, reason: str, fix: str) -> None:
        super().__init__(f"{source}: {reason}. Fix: {fix}.")
        self.source, self.reason, self.fix = source, reason, fix


@dataclass(frozen=True)
class ProtocolRule:
    """One rule: a series whose description matches ``description`` (and not ``exclude``),
    acquired in ``orientation`` (any if None), gets protocol ``key``."""

    key: str
    description: re.Pattern[str]
    orientation: str | None = None
    exclude: re.Pattern[str] | None = None

    def matches(self, description: str, orientation: str | None) -> bool:
        if self.orientation is not None and orientation != self.orientation:
            return False
        if not self.description.search(description):
            return False
        return not (self.exclude is not None and self.exclude.search(description))


@dataclass(frozen=True)
class ProtocolRules:
    """Ordered rules mapping MR series to protocol keys; CT series always get ``"CT"``.

    Attributes:
        rules: tried in order, the first match wins.
        ignore: descriptions matching it map to None before any rule is tried (localisers).
        source: where the rules came from (a file path or ``"defaults"``), for messages.
    """

    rules: tuple[ProtocolRule, ...]
    ignore: re.Pattern[str] | None = None
    source: str = "defaults"
    keys: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(dict.fromkeys(r.key for r in self.rules)))

    @classmethod
    def default(cls) -> ProtocolRules:
        """The built-in rules for T1_COR, T2W_COR, T1_AX, T2W_AX and PDFS_SAG."""
        return cls.from_toml_text(DEFAULT_RULES_TOML, source="defaults")

    @classmethod
    def from_toml(cls, path: Path) -> ProtocolRules:
        """Read a site's ``protocols.toml``.

        Raises:
            ProtocolRulesError: the file is unreadable, is not TOML, or has a bad entry; the
                message names the file and the entry.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProtocolRulesError(str(path), f"cannot read ({exc})", "make it a UTF-8 text file") from exc
        return cls.from_toml_text(text, source=str(path))

    @classmethod
    def from_toml_text(cls, text: str, source: str = "protocols.toml") -> ProtocolRules:
        """Parse rules from TOML text (format in docs/site-data.md); ``source`` names it in errors."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ProtocolRulesError(
                source, f"not valid TOML ({exc})", "see docs/site-data.md for the format"
            ) from exc
        unknown = set(data) - {"ignore", "rule"}
        if unknown:
            raise ProtocolRulesError(
                source,
                f"unknown top-level entries {sorted(unknown)}",
                "only `ignore = '...'` and [[rule]] tables are allowed",
            )
        ignore = _compile(data["ignore"], source, "ignore") if "ignore" in data else None
        entries = data.get("rule", [])
        if not isinstance(entries, list) or not entries:
            raise ProtocolRulesError(
                source, "no [[rule]] tables", "add at least one [[rule]] with key and description"
            )
        return cls(tuple(_parse_rule(e, i + 1, source) for i, e in enumerate(entries)), ignore, source)

    def ignores(self, description: str | None) -> bool:
        """Whether ``description`` matches the ``ignore`` pattern (localisers and the like)."""
        return self.ignore is not None and bool(self.ignore.search((description or "").strip()))

    def match(self, description: str | None, orientation: str | None, modality: str | None) -> str | None:
        """Protocol key of a series, ``"CT"`` for CT, or None when no rule matches.

        Args:
            description: SeriesDescription (or ProtocolName when that is empty).
            orientation: ``"AX"``, ``"COR"`` or ``"SAG"`` from ImageOrientationPatient.
            modality: DICOM Modality; only ``"MR"`` series are matched against the rules.
        """
        if modality == "CT":
            return "CT"
        if modality != "MR":
            return None
        text = (description or "").strip()
        if not text or self.ignores(text):
            return None
        for rule in self.rules:
            if rule.matches(text, orientation):
                return rule.key
        return None


def _compile(pattern: object, source: str, where: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise ProtocolRulesError(source, f"{where} must be a non-empty string", "write a regex in quotes")
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ProtocolRulesError(
            source,
            f"{where}: bad regular expression {pattern!r} ({exc})",
            "use single quotes in TOML so backslashes stay literal, and check brackets",
        ) from exc


def _parse_rule(entry: object, number: int, source: str) -> ProtocolRule:
    if not isinstance(entry, dict):
        raise ProtocolRulesError(source, f"rule {number} is not a table", "write it as [[rule]]")
    key = entry.get("key")
    where = f"rule {number}" + (f" (key {key!r})" if isinstance(key, str) else "")
    unknown = set(entry) - {"key", "description", "orientation", "exclude"}
    if unknown:
        raise ProtocolRulesError(
            source,
            f"{where} has unknown fields {sorted(unknown)}",
            "allowed fields are key, description, orientation, exclude",
        )
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", key) or key == "CT":
        raise ProtocolRulesError(
            source,
            f"{where}: key must be a name like T1_COR (letters, digits, _; not CT)",
            'set key = "T1_COR" or similar',
        )
    if "description" not in entry:
        raise ProtocolRulesError(source, f"{where} has no description regex", "add description = '...'")
    orientation = entry.get("orientation")
    if orientation is not None and (
        not isinstance(orientation, str) or orientation.upper() not in ORIENTATIONS
    ):
        raise ProtocolRulesError(
            source,
            f"{where}: orientation {orientation!r} is not AX, COR or SAG",
            "use AX, COR or SAG, or leave it out",
        )
    exclude = entry.get("exclude")
    return ProtocolRule(
        key=key,
        description=_compile(entry["description"], source, f"{where} description"),
        orientation=orientation.upper() if orientation else None,
        exclude=_compile(exclude, source, f"{where} exclude") if exclude is not None else None,
    )
