"""Bounds on a training reply: its weight from the site's inventory, its update's norm from the round's median.

- **Weight**: ``num-examples`` of a training reply is capped by what the site reported in the
  inventory query at the start of the run (:func:`example_cap`): MR-CT pairs, at most
  ``pretrain-max-pairs``, in pretraining (a site trains on its train+val pairs, capped the same
  way); labelled training hips in staging. A claim above the cap is clipped to it and reported.
  A node that did not answer the inventory has no cap of its own: it gets the smallest site's.
- **Norm**: the L2 norm of each update (the reply's weights minus the weights the server sent,
  float tensors only) is compared with the median norm of the round's replies; above
  ``update-norm-factor`` x the median it is excluded (3+ replies, a median above 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message

from common.config import RunConfig


def example_cap(phase: str, counts: dict, cfg: RunConfig) -> int | None:
    """The most examples a site can train on in ``phase``, from its inventory ``counts`` (None: unknown)."""
    if phase == "pretrain" and "pairs" in counts:
        return min(int(counts["pairs"]), int(cfg.pretrain_max_pairs))
    if phase == "stage" and "labelled-train" in counts:
        return int(counts["labelled-train"])
    return None


def update_norm(arrays: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - sent`` over the float tensors both hold (float64 sums)."""
    total = 0.0
    for name, value in arrays.items():
        base = sent.get(name)
        if base is None or not np.issubdtype(value.dtype, np.floating):
            continue
        diff = value.astype(np.float64) - base.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


def norm_outliers(norms: dict[str, float], factor: float) -> tuple[float, dict[str, float]]:
    """``(median, {site: norm})`` of the norms above ``factor`` x the median.

    Nothing is an outlier with fewer than 3 norms, ``factor`` 0 (the bound is off) or a median of 0
    (most sites sent the weights back unchanged: a factor of nothing bounds nothing).
    """
    if len(norms) < 3 or factor <= 0:
        return float("nan"), {}
    median = float(np.median(list(norms.values())))
    if median <= 0:
        return median, {}
    return median, {site: n for site, n in norms.items() if n > factor * median}


@dataclass
class ReplyBounds:
    """The caps of one phase (site name -> most examples) and the weights sent in the current round.

    ``caps`` None means no inventory was given (a strategy built outside a run): nothing is clipped.
    """

    phase: str
    norm_factor: float
    caps: dict[str, int] | None = None
    sent: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def for_phase(cls, phase: str, cfg: RunConfig, inventory: dict[str, dict] | None) -> ReplyBounds:
        caps = None
        if inventory is not None:
            found = {name: example_cap(phase, counts, cfg) for name, counts in inventory.items()}
            caps = {name: cap for name, cap in found.items() if cap is not None}
        return cls(phase, float(cfg.update_norm_factor), caps)

    def clip(self, site: str, bound: bool, claimed: float) -> tuple[float, str | None]:
        """``(weight to use, reason when clipped)`` for a training reply claiming ``claimed`` examples.

        Args:
            site: the name the server bound to the node.
            bound: whether the node answered the inventory (else it gets the smallest site's cap).
            claimed: the reply's ``num-examples``.
        """
        if self.caps is None:
            return claimed, None
        if bound and site in self.caps:
            cap, source = self.caps[site], f"its inventory allows {self.caps[site]}"
        elif self.caps:
            cap = min(self.caps.values())
            source = f"it did not answer the inventory query, so it gets the smallest site's {cap}"
        else:
            return claimed, None
        if claimed <= cap:
            return claimed, None
        what = "MR-CT pairs" if self.phase == "pretrain" else "labelled training hips"
        return float(cap), f"claimed num-examples={claimed:g} {what}, but {source}: weight clipped to {cap}"


class ReplyChecks:
    """Checks of :class:`server.strategy.GuardedStrategy` that bind a reply to its node and bound its claims.

    Uses the guard's ``state`` (bound ``sites``), ``bounds`` (:class:`ReplyBounds`), ``site_of`` and
    ``_fail`` (records a failure with its ``action``).
    """

    state: Any
    bounds: ReplyBounds
    _unbound_flagged: set[int]

    def _check_name(self, server_round: int, step: str, msg: Message, site: str) -> None:
        """Flag a reply whose self-reported name differs from its node's bound name."""
        if not msg.has_content() or "site" not in msg.content.config_records:
            return
        claimed = str(msg.content.config_records["site"].get("site-name", ""))
        node = msg.metadata.src_node_id
        if node not in self.state.sites:
            if node not in self._unbound_flagged:  # once per phase: the label stays node-ID
                self._unbound_flagged.add(node)
                reason = f"node {node} did not answer the inventory query; its claimed name {claimed!r} is not used"
                self._fail(server_round, step, site, reason, "flagged")
        elif claimed != site:
            reason = (
                f"node {node} registered as {site!r} at the inventory query but this reply claims {claimed!r}"
            )
            self._fail(server_round, step, site, reason, "flagged")

    def _clip_examples(self, server_round: int, step: str, msg: Message, site: str) -> float:
        """The reply's ``num-examples``, clipped in place to the site's inventory (training replies)."""
        metrics = next(iter(msg.content.metric_records.values()))
        claimed = float(metrics["num-examples"])
        if step != "train":
            return claimed
        bound = msg.metadata.src_node_id in self.state.sites
        weight, reason = self.bounds.clip(site, bound, claimed)
        if reason is not None:
            metrics["num-examples"] = int(weight) if isinstance(metrics["num-examples"], int) else weight
            self._fail(server_round, step, site, reason, "clipped")
        return weight

    def _exclude_outsized(
        self, server_round: int, kept: list[Message], norms: dict[str, float]
    ) -> list[Message]:
        """Drop training replies whose update norm exceeds ``update-norm-factor`` x the round's median."""
        median, outliers = norm_outliers(norms, self.bounds.norm_factor)
        account = self.state.account
        account.update_norms = {site: round(n, 6) for site, n in sorted(norms.items())}
        if median == median:  # not NaN: the bound applied this round
            account.update_norm_median = median
        for site, norm in outliers.items():
            reason = (
                f"update L2 norm {norm:.4g} is {norm / median:.1f} x the round's median {median:.4g}, above "
                f"update-norm-factor={self.bounds.norm_factor:g}; excluded from the aggregate"
            )
            self._fail(server_round, "train", site, reason, "excluded")
        return [m for m in kept if self.site_of(m) not in outliers]
