"""Robust aggregation rules' preconditions, checked before Flower's own rule runs on the screened replies.

Each mixin sits between :class:`server.strategy.GuardedStrategy` and a Flower strategy
(``GuardedKrum(GuardedStrategy, KrumRule, Krum)``): the guard screens the replies, the mixin
checks that the rule can work for ``n`` replies and ``f = num-malicious-sites``, and Flower's
class aggregates. Where the settings cannot work even with every site answering, the round fails
with :class:`RobustRuleError` naming the rule, ``n``, ``f`` and the fix, rather than Flower's silent
skip (Bulyan) or a traceback (trimmed mean); where sites were lost this round (failed, or excluded
by the norm bound), the round falls back to the coordinate-wise median.

Requirements (``n`` = sound replies with examples, ``f`` = ``num-malicious-sites``):

- ``fedtrimmedavg``: ``int(trimmed-beta x n) >= 1``, else nothing is trimmed;
- ``krum``, ``multikrum``: ``n >= f + 3``, so that each reply is scored against at least one
  neighbour beyond the ``f`` assumed malicious (Flower's score uses the ``n - f - 2`` nearest).
  Blanchard et al.'s guarantee needs ``n > 2f + 2``; between the two the rule runs and the log
  says the guarantee does not hold (4 sites with ``f = 1`` is such a case);
- ``multikrum`` averages the ``n - f`` best-scored replies (weighted by their clipped examples);
- ``bulyan``: ``n >= 4f + 3`` (El Mhamdi et al.), e.g. 7 sites for ``f = 1``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp.strategy import FedMedian

log = logging.getLogger("onfh.server")


class RobustRuleError(RuntimeError):
    """A robust rule cannot work for this round's number of replies; the message names the fix."""


def trimmed_problem(beta: float, n: int) -> str | None:
    """Why FedTrimmedAvg with ``beta`` would not trim ``n`` replies, or None."""
    if int(beta * n) >= 1:
        return None
    return (
        f"fedtrimmedavg with trimmed-beta={beta:g} trims int({beta:g} x {n}) = 0 of the {n} replies at each "
        f"end, so it would be a plain mean: set trimmed-beta to at least 1/{n} = {1 / n:.3f} (and below 0.5), "
        "or use strategy = 'fedmedian'"
    )


def krum_problem(rule: str, n: int, f: int) -> str | None:
    """Why Krum/Multi-Krum cannot score ``n`` replies against ``f`` malicious ones, or None."""
    if n >= f + 3:
        return None
    return (
        f"{rule} needs n >= f + 3 replies (each scored against its n - f - 2 nearest), but n={n} with "
        f"num-malicious-sites f={f}: lower num-malicious-sites to {max(n - 3, 0)} or fewer, add sites, "
        "or use strategy = 'fedmedian'"
    )


def bulyan_problem(n: int, f: int) -> str | None:
    """Why Bulyan cannot aggregate ``n`` replies against ``f`` malicious ones, or None."""
    if n >= 4 * f + 3:
        return None
    return (
        f"bulyan needs n >= 4f + 3 replies, but n={n} with num-malicious-sites f={f} (needs {4 * f + 3}): "
        f"lower num-malicious-sites to {max((n - 3) // 4, 0)}, add sites, or use strategy = 'krum', "
        "'multikrum' or 'fedmedian'"
    )


class _RuleCheck(ABC):
    """Checks, before Flower's rule runs, that the rule can work for the round's replies.

    Settings that cannot work even when every site asked answers are a configuration error: the
    round fails with :class:`RobustRuleError`. When sites were lost this round (failed, or excluded
    by the norm bound) and too few remain for the rule, the round is aggregated by the
    coordinate-wise median instead, with a warning: losing an attacker must not end the run.
    """

    @abstractmethod
    def _rule_problem(self, n: int) -> str | None:
        """Why the rule cannot aggregate ``n`` replies (a message naming the setting), or None."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        if not replies:
            return super().aggregate_train(server_round, replies)  # type: ignore[misc]
        where = f"phase {self.state.phase} round {self._absolute(server_round)}"  # type: ignore[attr-defined]
        asked = max(len(self.state.last_sent), len(replies))  # type: ignore[attr-defined]
        if problem := self._rule_problem(asked):
            raise RobustRuleError(f"{where}: {problem}")
        if problem := self._rule_problem(len(replies)):
            log.warning(
                "%s: %d of %d sites remain; median aggregation this round: %s",
                where,
                len(replies),
                asked,
                problem,
            )
            return FedMedian.aggregate_train(self, server_round, replies)  # type: ignore[arg-type]
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]


class TrimmedRule(_RuleCheck):
    """FedTrimmedAvg's check: ``trimmed-beta`` must trim at least one reply at each end."""

    beta: float

    def _rule_problem(self, n: int) -> str | None:
        return trimmed_problem(self.beta, n)


class KrumRule(_RuleCheck):
    """Krum's check (``n >= f + 3``), and a warning where Blanchard's guarantee (``n > 2f + 2``) fails."""

    rule = "krum"
    num_malicious_nodes: int

    def _rule_problem(self, n: int) -> str | None:
        f = self.num_malicious_nodes
        problem = krum_problem(self.rule, n, f)
        if problem is None and n <= 2 * f + 2:
            log.warning(
                "%s with n=%d replies and num-malicious-sites f=%d: Krum's guarantee needs n > 2f + 2 = %d; "
                "the rule still runs, each reply scored against its %d nearest",
                self.rule,
                n,
                f,
                2 * f + 2,
                n - f - 2,
            )
        return problem


class MultiKrumRule(KrumRule):
    """Multi-Krum: Krum's check, then the ``n - f`` best-scored replies are averaged."""

    rule = "multikrum"
    num_nodes_to_select: int

    def _rule_problem(self, n: int) -> str | None:
        self.num_nodes_to_select = max(1, n - self.num_malicious_nodes)
        return super()._rule_problem(n)


class BulyanRule(_RuleCheck):
    """Bulyan's check: ``n >= 4f + 3`` (Flower would skip the round with a warning)."""

    num_malicious_nodes: int

    def _rule_problem(self, n: int) -> str | None:
        return bulyan_problem(n, self.num_malicious_nodes)
