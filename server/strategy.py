"""Flower strategies chosen by config, guarded: screened and bounded replies, failures, pooled evaluation.

The guard validates every update, binds each reply to the site name its node gave at the
inventory query, clips ``num-examples`` to the site's inventory and excludes updates whose norm is
far above the round's median (:mod:`server.bounds`); robust rules check their preconditions first
(:mod:`server.robust`). Evaluations are pooled from score histograms; each round is accounted and
ends with a callback.

``GuardedStrategy`` is a mixin placed before a Flower strategy class (``GuardedFedAvg(GuardedStrategy,
FedAvg)``, one named class per strategy in ``common.config.STRATEGIES``). It overrides only
``configure_*`` and ``aggregate_*`` and calls ``super()``, so each keeps Flower's own aggregation rule
and ``start()``. What is accounted per round is described in :mod:`server.accounting`. With
differential privacy (:mod:`server.privacy`) the screened updates are clipped, averaged and noised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from common.config import RunConfig
from common.records import from_record, to_record
from server.accounting import RoundAccount, RoundClock, short_reason
from server.bounds import ReplyBounds, ReplyChecks, update_norm
from server.privacy import SiteLevelDP
from server.secure_rounds import RevealedMean, SecureRounds
from server.validation import update_problem

log = logging.getLogger("onfh.server")

RoundEnd = Callable[[int, ArrayRecord, dict], None]  # (absolute round, global arrays, evaluation summary)


@dataclass
class PhaseState:
    """What the strategy learns during one phase; the server checkpoints it each round."""

    phase: str
    round_offset: int = 0
    # node id -> site name, bound at the inventory query (not patient data); replies cannot rename
    sites: dict[int, str] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    last_arrays: ArrayRecord | None = None
    last_sent: list[int] = field(default_factory=list)
    account: RoundAccount = field(default_factory=RoundAccount)  # the round in progress


class GuardedStrategy(SecureRounds, ReplyChecks):
    """Mixin placed before a Flower strategy class: validates replies and accounts for each round.

    Args:
        state: the phase's state, shared with the server (sites, failures, round entries).
        cfg: the run's settings (``min-sites`` and the strategy's own settings).
        reference: the global model's arrays; every update must match their names, shapes, dtypes.
        on_round_end: called after each round's evaluation with (round, arrays, summary).
        **options: keyword arguments of the Flower strategy class beyond the node counts.
    """

    def __init__(
        self,
        state: PhaseState,
        cfg: RunConfig,
        reference: dict[str, np.ndarray],
        on_round_end: RoundEnd | None = None,
        **options: object,
    ) -> None:
        self.state = state
        self.reference = {k: (tuple(v.shape), str(v.dtype)) for k, v in reference.items()}
        self.min_sites = cfg.min_sites
        # Caps come with the inventory (build_strategy); without one nothing is clipped.
        self.bounds = ReplyBounds.for_phase(state.phase, cfg, None)
        self.privacy: SiteLevelDP | None = None  # set by build_strategy for a phase under DP
        # Secure aggregation (server/secagg.py): one session per round, or per final test.
        self.secure_aggregation = cfg.secure_aggregation
        self.secagg_clip_range = cfg.secagg_clip_range
        self.histogram_bins = cfg.histogram_bins
        self.timeout = cfg.round_timeout_s
        self._unbound_flagged: set[int] = set()
        self._sent: list[Message] = []  # this step's messages; their ids are set when Flower pushes them
        self.on_round_end = on_round_end or (lambda *_: None)
        # Every connected site is asked each round; a round needs ``min-sites`` usable replies.
        super().__init__(  # type: ignore[call-arg]  # the Flower strategy after this mixin in the MRO
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=cfg.min_sites,
            min_evaluate_nodes=cfg.min_sites,
            min_available_nodes=cfg.min_sites,
            **options,
        )

    # -- helpers -----------------------------------------------------------------------------
    def _tally_sent(self, step: str, messages: list[Message]) -> None:
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.state.account.tally(f"{step}-sent", self.state.sites.get(node, f"node-{node}"), msg)

    def _absolute(self, server_round: int) -> int:
        return self.state.round_offset + server_round

    def site_of(self, msg: Message) -> str:
        """The site name bound to the reply's node at the inventory query, else ``node-ID``.

        Never read from the message: a reply cannot rename its node (see :meth:`_check_name`).
        """
        node = self.node_of(msg)
        return self.state.sites.get(node, f"node-{node}")

    def _bind_registered(self, grid: Grid, messages: list[Message]) -> None:
        """Name nodes that joined after the inventory by the name registered with their key, if any.

        In deployment ``onfh server register`` registers each site's key under the site's name, so a
        site that joins mid-run is named by the central host, never by its own messages.
        """
        new = {m.metadata.dst_node_id for m in messages} - set(self.state.sites)
        if new:
            registered = {n.node_id: getattr(n, "name", "") for n in grid.get_nodes()}
            self.state.sites.update({node: registered[node] for node in new if registered.get(node)})

    def node_of(self, msg: Message) -> int:
        """The node a reply answers for.

        An error reply for a node that went offline is written by the SuperLink itself (its own node
        id), so it is matched to the message it answers, which was sent to the site's node.
        """
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent if m.metadata.message_id}
        return sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def _fail(self, server_round: int, step: str, site: str, reason: str, action: str = "rejected") -> None:
        """Record a reply the round did not take as sent: ``rejected``, ``excluded``, ``clipped``, ``flagged``."""
        entry = {
            "phase": self.state.phase,
            "round": self._absolute(server_round),
            "step": step,
            "site": site,
            "reason": reason,
            "action": action,
        }
        self.state.failures.append(entry)
        log.warning("round %d %s: site %s %s: %s", entry["round"], step, site, action, reason)

    def _update_problem(self, msg: Message) -> tuple[str | None, dict[str, np.ndarray]]:
        """Why a training reply's arrays may not be aggregated, and the arrays (float16 cast to float32 in place)."""
        records = list(msg.content.array_records.values())
        if len(records) != 1:
            return f"reply carries {len(records)} array records, expected 1", {}
        arrays = from_record(records[0])
        problem = update_problem(self.reference, arrays)
        if problem is None and any(v.dtype == np.float16 for v in arrays.values()):
            # Aggregate in float32 whatever the wire dtype was (repacked only when needed).
            arrays = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in arrays.items()}
            msg.content[next(iter(msg.content.array_records.keys()))] = to_record(arrays)
        return problem, arrays

    def screen(
        self, server_round: int, replies: Iterable[Message], step: str, check_arrays: bool
    ) -> list[Message]:
        """Keep the sound replies; record every failure and every missing reply."""
        replies = list(replies)
        replied = {self.node_of(m) for m in replies}
        for node in self.state.last_sent:
            if node not in replied:
                site = self.state.sites.get(node, f"node-{node}")
                self._fail(server_round, step, site, "no reply before the round timeout")
        kept, idle, norms = [], 0, {}
        for msg in replies:
            site = self.site_of(msg)
            if msg.has_content():  # every reply is traffic, sound or not; counted as it arrived
                self.state.account.tally(f"{step}-received", site, msg)
            if msg.has_error():
                self._fail(server_round, step, site, f"error at the site: {short_reason(msg.error.reason)}")
                continue
            self._check_name(server_round, step, msg, site)
            metrics = next(iter(msg.content.metric_records.values()), None)
            if metrics is None or "num-examples" not in metrics:
                self._fail(server_round, step, site, "reply has no 'num-examples' metric")
                continue
            if step == "train" and "train-seconds" in metrics:
                self.state.account.site_train_seconds[site] = float(metrics["train-seconds"])
            if self._clip_examples(server_round, step, msg, site) <= 0 and not self.secure_aggregation:
                idle += 1  # the site has no data for this step: it answers but does not take part
                continue  # (a masked reply is kept: its masks are needed for the sum, its weight is 0)
            if check_arrays:
                problem, arrays = self._update_problem(msg)
                if problem:
                    self._fail(server_round, step, site, problem)
                    continue
                if self.bounds.sent:
                    norms[site] = update_norm(arrays, self.bounds.sent)
            kept.append(msg)
        if step == "train":
            kept = self._exclude_outsized(server_round, kept, norms)
        kept.sort(key=self.site_of)  # a fixed order makes the float sums, hence resumed runs, reproducible
        if len(kept) + idle < self.min_sites:
            raise RuntimeError(
                f"phase {self.state.phase} round {self._absolute(server_round)}: only {len(kept) + idle} sites "
                f"answered the {step} step soundly, fewer than min-sites={self.min_sites}; "
                f"latest failures: {self.state.failures[-5:]}"
            )
        return kept

    # -- Flower hooks ------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        account = self.state.account = RoundAccount(RoundClock.for_training())
        config["phase"] = self.state.phase
        config["phase-round"] = self._absolute(server_round)
        self.bounds.sent = from_record(arrays)  # each update's norm is measured from these
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._bind_registered(grid, messages)
        if self.secure_aggregation:
            messages = self._secure(
                server_round, grid, messages, "train", {"max-examples": self._max_examples()}
            )
        self.state.last_sent = [m.metadata.dst_node_id for m in messages]
        self._sent = messages
        self._tally_sent("train", messages)
        account.clock.train_sent = time.perf_counter()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies_in = time.perf_counter()
        note = None
        if self.secure_aggregation and self.session is None:  # too few sites to open a session:
            kept = []  # nothing was sent, the round is refused (recorded) and the weights stay
            arrays, metrics = to_record(self.bounds.sent), MetricRecord({"num-examples": 0.0})
        elif self.secure_aggregation:
            kept = self.screen(server_round, replies, "train", check_arrays=False)
            arrays, metrics, note = self._secure_train(server_round, kept)
        else:
            kept = self.screen(server_round, replies, "train", check_arrays=True)
            arrays, metrics = super().aggregate_train(server_round, kept)
            if isinstance(self, RevealedMean):  # a server optimiser: its step for the weights only
                arrays = self.statistics_averaged(arrays)
        if (
            self.privacy is not None and kept and not self.secure_aggregation
        ):  # Flower's metrics; the weights: clipped mean + noise
            updates = [from_record(next(iter(m.content.array_records.values()))) for m in kept]
            released, note = self.privacy.release(
                self.bounds.sent, updates, self.state.rounds, self._absolute(server_round)
            )
            arrays = to_record(released)
        self.state.last_arrays = arrays
        account = self.state.account
        account.train_done(replies_in)
        self.state.rounds.append(account.entry(self._absolute(server_round), dict(metrics or {}), len(kept)))
        if note is not None:
            self.state.rounds[-1]["privacy"] = note
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.state.account.clock.evaluate_begun = time.perf_counter()
        config["phase"] = self.state.phase
        config.setdefault("split", "val")
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._bind_registered(grid, messages)
        if self.secure_aggregation:
            messages = self._secure(server_round, grid, messages, "evaluate")
        self.state.last_sent = [m.metadata.dst_node_id for m in messages]
        self._sent = messages
        self._tally_sent("evaluate", messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        summary = self.pooled_evaluation(server_round, replies, "evaluate")
        metrics = MetricRecord({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        if self.state.rounds and self.state.rounds[-1]["round"] == self._absolute(server_round):
            self.state.rounds[-1]["evaluate"] = summary
        done = self.state.account.evaluate_done()
        if self.state.last_arrays is not None:
            self.on_round_end(self._absolute(server_round), self.state.last_arrays, summary)
            # Measured after the metrics line is written: it reaches results.json only.
            self.state.account.seconds["on-round-end"] = time.perf_counter() - done
        return metrics
