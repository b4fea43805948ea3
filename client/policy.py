"""A site's own limits on what the server may ask of it: the site policy (a TOML file the hospital writes).

The server chooses every run setting, and a site would otherwise train for as many epochs, on
as large hips, with as fine an evaluation histogram as it is asked. The policy bounds those
settings; a run config outside it is refused before the site loads, trains or scores anything.
The file holds one ``[limits]`` table (``presets/site/policy.toml`` is a documented example)::

    [limits]
    max-stage-epochs = 10      # run config stage-epochs <= 10
    min-batch-size = 4         # run config batch-size >= 4
    max-wall-time-s = 3600     # one task (a round's training or evaluation) at most one hour

Each ``max-X``/``min-X`` bounds run-config key ``X`` (but ``max-pretrain-pairs``, which bounds
``pretrain-max-pairs``); keys the file leaves out keep the built-in default (:data:`LIMITS`),
generous but finite, which is also the whole policy of a site that has no file. Unknown keys
are refused with the key and the file named. ``max-wall-time-s`` cannot be read off the run
config: the task's clock (:class:`Deadline`) is checked once the site's data are loaded and after
every local epoch, and a task past it stops with an error and sends nothing (an epoch or an
evaluation pass that has begun runs to its end).

Two keys bound what an evaluation reply releases rather than what the server may ask
(:class:`ReleaseBounds`; the site applies them itself, whatever the run config says):
``min-release-hips`` (default 10): an evaluation of fewer hips (staging) or fewer patients
(pretraining: MR-CT slice pairs come a patient at a time) is withheld, and the reply says only
that; ``max-release-bins`` (default 20): score histograms are released with
``min(histogram-bins, max-release-bins)`` bins, the requested grid coarsened, never refused.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import RunConfig

# policy key -> (run-config key, "max" or "min", built-in default). The defaults let through the
# paper's scale (hips 16 x 128) and every preset, with room; they stop a runaway request.
LIMITS: dict[str, tuple[str, str, int]] = {
    "max-pretrain-rounds": ("pretrain-rounds", "max", 1000),
    "max-stage-rounds": ("stage-rounds", "max", 1000),
    "max-pretrain-epochs": ("pretrain-epochs", "max", 50),
    "max-stage-epochs": ("stage-epochs", "max", 50),
    "max-batch-size": ("batch-size", "max", 256),
    # A step on one hip makes its update a function of that hip alone.
    "min-batch-size": ("batch-size", "min", 2),
    "max-pretrain-pairs": ("pretrain-max-pairs", "max", 100_000),
    "max-hip-slices": ("hip-slices", "max", 64),
    "max-hip-size": ("hip-size", "max", 256),
}
WALL_TIME_KEY = "max-wall-time-s"
# policy key -> built-in default of the release bounds (ReleaseBounds), applied at the site.
RELEASE_KEYS: dict[str, int] = {"min-release-hips": 10, "max-release-bins": 20}
# true: the site refuses training and evaluation requests without secure aggregation (default false).
SECURE_KEY = "require-secure-aggregation"
# Keys of earlier policy files -> what replaced them (named in the error, with the fix).
RENAMED = {
    "max-histogram-bins": "max-release-bins (the site now coarsens a finer histogram-bins instead of refusing it)"
}
DEFAULT_WALL_TIME_S = 86_400.0  # one day per task
DEFAULT_SOURCE = "the built-in default; set node config policy-file to change it"
# Pretraining steps take max(batch-size, 16) MR-CT slice pairs (RunConfig.pretrain_training).
PRETRAIN_MIN_BATCH = 16


class PolicyError(ValueError):
    """A site policy file that cannot be used: missing, not TOML, an unknown key or a bad value."""


class PolicyRefusal(RuntimeError):
    """The site refuses a task its policy does not allow.

    Its text names settings, bounds and the policy file's name (not its folder), never data, so
    the ClientApp passes it to the server as it is.
    """


@dataclass(frozen=True)
class Violation:
    """One run-config value outside the site's policy."""

    key: str  # run-config key, e.g. "stage-epochs"
    requested: float
    bound: float
    kind: str  # "max" or "min"
    source: str  # the policy file's name, or DEFAULT_SOURCE

    @property
    def allowed(self) -> str:
        """``"at most 5"`` or ``"at least 2"``."""
        return f"{'at most' if self.kind == 'max' else 'at least'} {self.bound:g}"

    def __str__(self) -> str:
        return f"run-config {self.key} = {self.requested:g}: its policy ({self.source}) allows {self.allowed}"


def _number(path: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(f"site policy {path}: {key} = {value!r} is not a number")
    if key != WALL_TIME_KEY and value != int(value):
        raise PolicyError(f"site policy {path}: {key} = {value!r} must be a whole number")
    if value <= 0:
        raise PolicyError(f"site policy {path}: {key} = {value!r} must be > 0")
    return float(value)


@dataclass(frozen=True)
class ReleaseBounds:
    """What one evaluation reply of this site may release, whatever the run config asks.

    Attributes:
        min_hips: ``min-release-hips``; an evaluation of fewer hips (staging) or patients
            (pretraining) is withheld: no AUROC, confusion counts, histogram or image metrics.
        max_bins: ``max-release-bins``; score histograms have at most this many bins.
    """

    min_hips: int = RELEASE_KEYS["min-release-hips"]
    max_bins: int = RELEASE_KEYS["max-release-bins"]

    def bins(self, requested: int) -> int:
        """The bins a histogram is released with: the run's ``histogram-bins``, coarsened to ``max_bins``."""
        return min(int(requested), self.max_bins)

    def withholds(self, n: int) -> bool:
        """Whether an evaluation of ``n`` hips (or patients) is withheld."""
        return n < self.min_hips


@dataclass(frozen=True)
class SitePolicy:
    """The bounds one site puts on a run config, and where they come from.

    Attributes:
        limits: policy key (a key of :data:`LIMITS`) -> bound; every key of ``LIMITS`` is present.
        wall_time_s: the most seconds one task (a training or evaluation message) may run.
        source: the policy file, or :data:`DEFAULT_SOURCE`; a violation names its file name.
        release: the bounds on what an evaluation reply releases (:class:`ReleaseBounds`).
    """

    limits: Mapping[str, float] = field(default_factory=lambda: {k: float(v[2]) for k, v in LIMITS.items()})
    wall_time_s: float = DEFAULT_WALL_TIME_S
    source: str = DEFAULT_SOURCE
    release: ReleaseBounds = field(default_factory=ReleaseBounds)
    require_secure_aggregation: bool = False

    @classmethod
    def load(cls, path: Path | str | None) -> SitePolicy:
        """The policy in TOML file ``path``; None or ``""``: the built-in default policy.

        Raises:
            PolicyError: the file is missing or not TOML, holds a key other than the ``[limits]``
                table and its keys (the message names the key and the file), or a bound is not a
                positive number, or ``min-batch-size`` exceeds ``max-batch-size``.
        """
        if path is None or str(path) == "":
            return cls()
        path = Path(path)
        if not path.is_file():
            raise PolicyError(
                f"site policy {path} not found: write one (see presets/site/policy.toml), or leave node "
                "config policy-file empty for the built-in default policy"
            )
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PolicyError(f"site policy {path} is not valid TOML ({exc})") from None
        for key in raw:
            if key != "limits":
                raise PolicyError(f"site policy {path}: unknown key {key}; the file holds one [limits] table")
        table = raw.get("limits", {})
        if not isinstance(table, dict):
            raise PolicyError(f"site policy {path}: limits must be a table, [limits]")
        limits = dict(cls().limits)
        wall_time_s = DEFAULT_WALL_TIME_S
        release = dict(RELEASE_KEYS)
        require_secure = False
        for key, value in table.items():
            if key == WALL_TIME_KEY:
                wall_time_s = _number(path, key, value)
            elif key == SECURE_KEY:
                if not isinstance(value, bool):
                    raise PolicyError(f"site policy {path}: {key} = {value!r} must be true or false")
                require_secure = value
            elif key in LIMITS:
                limits[key] = _number(path, key, value)
            elif key in RELEASE_KEYS:
                release[key] = int(_number(path, key, value))
            elif key in RENAMED:
                raise PolicyError(f"site policy {path}: {key} is no longer a key; use {RENAMED[key]}")
            else:
                known = ", ".join([*LIMITS, WALL_TIME_KEY, *RELEASE_KEYS, SECURE_KEY])
                raise PolicyError(f"site policy {path}: unknown key {key} in [limits]; known keys: {known}")
        if release["max-release-bins"] < 2:
            raise PolicyError(
                f"site policy {path}: max-release-bins = {release['max-release-bins']} must be at least 2 "
                "(a histogram of one bin holds no score at all)"
            )
        if limits["min-batch-size"] > limits["max-batch-size"]:
            raise PolicyError(
                f"site policy {path}: min-batch-size = {limits['min-batch-size']:g} exceeds "
                f"max-batch-size = {limits['max-batch-size']:g}"
            )
        if limits["max-batch-size"] < PRETRAIN_MIN_BATCH:
            raise PolicyError(
                f"site policy {path}: max-batch-size = {limits['max-batch-size']:g} is below "
                f"{PRETRAIN_MIN_BATCH}, the pairs every pretraining step takes; use {PRETRAIN_MIN_BATCH} or more"
            )
        bounds = ReleaseBounds(release["min-release-hips"], release["max-release-bins"])
        return cls(limits, wall_time_s, str(path), bounds, require_secure)

    @property
    def file_name(self) -> str:
        """How a refusal sent to the server names this policy: the file's name, not its folder
        (no path of the hospital leaves the site), or :data:`DEFAULT_SOURCE`."""
        return self.source if self.source == DEFAULT_SOURCE else Path(self.source).name

    def check(self, run: RunConfig | Mapping[str, Any]) -> list[Violation]:
        """Every value of ``run`` (a RunConfig, or a kebab-case run-config dict) outside the policy."""
        cfg = run if isinstance(run, RunConfig) else RunConfig.from_dict(dict(run))
        found = []
        for policy_key, (run_key, kind, _) in LIMITS.items():
            requested, bound = getattr(cfg, run_key.replace("-", "_")), self.limits[policy_key]
            if (requested > bound) if kind == "max" else (requested < bound):
                found.append(Violation(run_key, requested, bound, kind, self.file_name))
        return found

    def enforce(self, site: str, run: RunConfig | Mapping[str, Any]) -> None:
        """Raise :class:`PolicyRefusal` naming the site and every value out of policy (none: return)."""
        violations = self.check(run)
        if violations:
            first, *others = violations
            more = "".join(f"; also {v.key} = {v.requested:g} ({v.allowed})" for v in others)
            raise PolicyRefusal(f"site {site}: refuses {first}{more}")

    def deadline(self, site: str) -> Deadline:
        """A clock for one task, started now."""
        return Deadline(site, self.wall_time_s, self.file_name)


@dataclass
class Deadline:
    """The wall-time bound of one task: :meth:`check` between steps stops a task that ran too long."""

    site: str
    seconds: float
    source: str
    started: float = field(default_factory=time.monotonic)

    def check(self, done: str) -> None:
        """Raise :class:`PolicyRefusal` when the task has run past its bound; ``done`` is what it has
        just finished (a training loop's epoch line: only the part before its first colon is used)."""
        elapsed = time.monotonic() - self.started
        if elapsed > self.seconds:
            step = done.split(":", 1)[0]
            raise PolicyRefusal(
                f"site {self.site}: stopped after {step}: the task ran {elapsed:.0f} s, more than the "
                f"{self.seconds:g} s its policy ({self.source}) allows (max-wall-time-s); nothing was sent"
            )
