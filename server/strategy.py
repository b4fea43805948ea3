"""Flower strategies chosen by config, wrapped with update validation, failure accounting,
secure-aggregate evaluation (score histograms) and per-round checkpoints.

The wrapper overrides only ``configure_*`` and ``aggregate_*`` and calls ``super()``, so any of
Flower's strategies keeps its own aggregation rule.

It also accounts for each round (site names, byte counts and times only, never patient data),
in the round's entry of ``PhaseState.rounds`` (hence ``metrics.jsonl`` and ``results.json``):

- ``bytes``: tensor bytes of the messages' ArrayRecords (sum of the arrays' ``nbytes`` in their
  dtype on the wire; replies counted before the server casts float16 to float32) per site, under
  ``train-sent``, ``train-received``, ``evaluate-sent``, ``evaluate-received``;
- ``message-bytes``: the same messages' records as Flower counts them (``count_bytes()`` of every
  ArrayRecord, MetricRecord and ConfigRecord: tensors plus array headers, keys, metrics, config);
- ``seconds``: server wall-clock times of the round: ``train`` (configure_train to the end of
  aggregate_train), ``train-wait`` (messages out to replies in: transport and the sites' work),
  ``aggregate`` (screening and aggregation of the training replies), ``evaluate`` (configure_evaluate
  to the end of aggregate_evaluate), ``round`` (configure_train to the end of aggregate_evaluate);
  and, in ``results.json`` only, ``on-round-end`` (metrics line and checkpoint written after it);
- ``started``: the round's start (Unix time); ``site-train-seconds``: each site's reported
  ``train-seconds`` (its local training, data loading included).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
)

from common.config import RunConfig
from common.records import from_record, to_record
from common.training.evaluation import pooled_staging_metrics
from server.validation import update_problem

log = logging.getLogger("onfh.server")

BASES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
}


@dataclass
class PhaseState:
    """What the wrapper learns during one phase; the server app checkpoints it each round."""

    phase: str
    round_offset: int = 0
    sites: dict[int, str] = field(default_factory=dict)  # node id -> site name (not patient data)
    failures: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    last_arrays: ArrayRecord | None = None
    last_sent: list[int] = field(default_factory=list)
    # Accounting of the round in progress (bytes, times); it becomes part of the round's entry.
    pending: dict = field(default_factory=dict)


def tensor_bytes(record: ArrayRecord) -> int:
    """Bytes of the tensors an ArrayRecord carries, in their dtype as sent (sum of ``nbytes``)."""
    return int(
        sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values())
    )


def message_bytes(msg: Message) -> tuple[int, int]:
    """``(tensor bytes, record bytes)`` of a message's content; ``(0, 0)`` for an error reply.

    Tensor bytes: :func:`tensor_bytes` of every ArrayRecord. Record bytes: Flower's
    ``count_bytes()`` of every record (serialized arrays with their headers, keys, metrics, config).
    """
    if not msg.has_content():
        return 0, 0
    content = msg.content
    tensors = sum(tensor_bytes(r) for r in content.array_records.values())
    return int(tensors), int(sum(r.count_bytes() for r in content.values()))


class GuardedStrategy:
    """Mixin placed before a Flower strategy class (see :func:`build_strategy`)."""

    def guard(
        self,
        state: PhaseState,
        reference: dict[str, np.ndarray],
        min_sites: int,
        on_round_end: Callable[[int, ArrayRecord, dict], None],
    ) -> None:
        self.state = state
        self.reference = {k: (tuple(v.shape), str(v.dtype)) for k, v in reference.items()}
        self.min_sites = min_sites
        self.on_round_end = on_round_end

    # -- helpers -----------------------------------------------------------------------------
    def _tally(self, key: str, site: str, msg: Message) -> None:
        """Record the bytes of one message under ``key`` (e.g. ``train-sent``) for ``site``."""
        tensors, records = message_bytes(msg)
        self.state.pending.setdefault("bytes", {}).setdefault(key, {})[site] = tensors
        self.state.pending.setdefault("message-bytes", {}).setdefault(key, {})[site] = records

    def _tally_sent(self, step: str, messages: list[Message]) -> None:
        for msg in messages:
            node = msg.metadata.dst_node_id
            self._tally(f"{step}-sent", self.state.sites.get(node, f"node-{node}"), msg)

    def _seconds(self) -> dict:
        return self.state.pending.setdefault("seconds", {})

    def _absolute(self, server_round: int) -> int:
        return self.state.round_offset + server_round

    def site_of(self, msg: Message) -> str:
        node = msg.metadata.src_node_id
        if msg.has_content() and "site" in msg.content.config_records:
            self.state.sites[node] = str(msg.content.config_records["site"]["site-name"])
        return self.state.sites.get(node, f"node-{node}")

    def _fail(self, server_round: int, stage: str, site: str, reason: str) -> None:
        entry = {
            "phase": self.state.phase,
            "round": self._absolute(server_round),
            "step": stage,
            "site": site,
            "reason": reason,
        }
        self.state.failures.append(entry)
        log.warning("round %d %s: site %s rejected: %s", entry["round"], stage, site, reason)

    def screen(
        self, server_round: int, replies: Iterable[Message], step: str, check_arrays: bool
    ) -> list[Message]:
        """Keep the sound replies; record every failure and every missing reply."""
        replies = list(replies)
        replied = {m.metadata.src_node_id for m in replies}
        for node in self.state.last_sent:
            if node not in replied:
                self._fail(
                    server_round,
                    step,
                    self.state.sites.get(node, f"node-{node}"),
                    "no reply before the round timeout",
                )
        kept, idle = [], 0
        for msg in replies:
            site = self.site_of(msg)
            if msg.has_content():  # every reply is traffic, sound or not; counted as it arrived
                self._tally(f"{step}-received", site, msg)
            if msg.has_error():
                reason = short_reason(msg.error.reason)
                named = re.match(r"site ([\w.-]+): ", reason)
                if site.startswith("node-") and named:  # a site that failed before ever answering
                    site = named.group(1)
                self._fail(server_round, step, site, f"error at the site: {reason}")
                continue
            metrics = next(iter(msg.content.metric_records.values()), None)
            if metrics is None or "num-examples" not in metrics:
                self._fail(server_round, step, site, "reply has no 'num-examples' metric")
                continue
            if step == "train" and "train-seconds" in metrics:
                self.state.pending.setdefault("site-train-seconds", {})[site] = float(
                    metrics["train-seconds"]
                )
            if float(metrics["num-examples"]) <= 0:
                idle += 1  # the site has no data for this step: it answers but does not take part
                continue
            if check_arrays:
                records = list(msg.content.array_records.values())
                if len(records) != 1:
                    self._fail(
                        server_round, step, site, f"reply carries {len(records)} array records, expected 1"
                    )
                    continue
                arrays = from_record(records[0])
                problem = update_problem(self.reference, arrays)
                if problem:
                    self._fail(server_round, step, site, problem)
                    continue
                # Aggregate in float32 whatever the wire dtype was (repacked only when needed).
                if any(v.dtype == np.float16 for v in arrays.values()):
                    key = next(iter(msg.content.array_records.keys()))
                    msg.content[key] = to_record(
                        {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in arrays.items()}
                    )
            kept.append(msg)
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
        started, clock = time.time(), time.perf_counter()
        config["phase"] = self.state.phase
        config["phase-round"] = self._absolute(server_round)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.state.last_sent = [m.metadata.dst_node_id for m in messages]
        self.state.pending = {"started": started, "clock": clock}
        self._tally_sent("train", messages)
        self.state.pending["train-sent-clock"] = time.perf_counter()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        clock = time.perf_counter()
        pending = self.state.pending
        kept = self.screen(server_round, replies, "train", check_arrays=True)
        arrays, metrics = super().aggregate_train(server_round, kept)
        self.state.last_arrays = arrays
        done = time.perf_counter()
        seconds = self._seconds()
        if "clock" in pending:
            seconds["train"] = done - pending["clock"]
            seconds["train-wait"] = clock - pending.get("train-sent-clock", pending["clock"])
        seconds["aggregate"] = done - clock
        entry = {
            "round": self._absolute(server_round),
            "train": dict(metrics or {}),
            "train-sites": len(kept),
        }
        if "started" in pending:
            entry["started"] = pending["started"]
        # The same dicts as in ``pending``: the evaluate step's figures land in this entry too.
        for key in ("seconds", "bytes", "message-bytes"):
            entry[key] = pending.setdefault(key, {})
        if "site-train-seconds" in pending:
            entry["site-train-seconds"] = pending["site-train-seconds"]
        self.state.rounds.append(entry)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.state.pending["evaluate-clock"] = time.perf_counter()
        config["phase"] = self.state.phase
        config.setdefault("split", "val")
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.state.last_sent = [m.metadata.dst_node_id for m in messages]
        self._tally_sent("evaluate", messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        kept = self.screen(server_round, replies, "evaluate", check_arrays=False)
        summary = summarise_evaluation(self.state.phase, kept, self.site_of)
        metrics = MetricRecord({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        entry = None
        if self.state.rounds and self.state.rounds[-1]["round"] == self._absolute(server_round):
            entry = self.state.rounds[-1]
            entry["evaluate"] = summary
        pending, done = self.state.pending, time.perf_counter()
        seconds = self._seconds()
        if "evaluate-clock" in pending:
            seconds["evaluate"] = done - pending["evaluate-clock"]
        if "clock" in pending:
            seconds["round"] = done - pending["clock"]
        if self.state.last_arrays is not None:
            self.on_round_end(self._absolute(server_round), self.state.last_arrays, summary)
            seconds["on-round-end"] = time.perf_counter() - done  # after the metrics line: results.json only
        return metrics


def short_reason(reason: str, limit: int = 300) -> str:
    """The useful line of an error reply (Flower/Ray wrap a site's error in tracebacks)."""
    found = re.search(r"site [\w.-]+: [^\n'\\]+", reason)
    text = found.group(0) if found else reason.strip().splitlines()[-1] if reason.strip() else "unknown error"
    return text[:limit]


def summarise_evaluation(phase: str, replies: list[Message], site_of: Callable[[Message], str]) -> dict:
    """Pool the sites' evaluation replies: sums of histograms and confusion counts (stage phase),
    example-weighted means (pretraining phase), and each site's own figures."""
    per_site: dict[str, dict] = {}
    total = 0.0
    for msg in replies:
        record = next(iter(msg.content.metric_records.values()))
        per_site[site_of(msg)] = {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}
        total += float(record["num-examples"])
    summary: dict = {"num-examples": total, "sites": {}}
    if phase == "stage":
        hists = [np.asarray(s["score-histogram"], dtype=np.float64) for s in per_site.values()]
        confs = [np.asarray(s["confusion"], dtype=np.float64) for s in per_site.values()]
        if hists:
            summary.update(pooled_staging_metrics(sum(hists), sum(confs)))
            summary["score-histogram"] = sum(hists).tolist()
        for name, s in per_site.items():
            summary["sites"][name] = {k: v for k, v in s.items() if not isinstance(v, list)}
    else:
        for key in ("mae-hu", "psnr", "ssim"):
            if total > 0:
                summary[key] = (
                    sum(float(s[key]) * float(s["num-examples"]) for s in per_site.values()) / total
                )
        summary["sites"] = per_site
    return summary


def build_strategy(cfg: RunConfig) -> GuardedStrategy:
    """A Flower strategy of the configured kind, wrapped by :class:`GuardedStrategy`.

    Every connected site is asked each round; a round needs ``min-sites`` usable replies.
    """
    base = BASES[cfg.strategy]
    cls = type(f"Guarded{base.__name__}", (GuardedStrategy, base), {})
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=cfg.min_sites,
        min_evaluate_nodes=cfg.min_sites,
        min_available_nodes=cfg.min_sites,
    )
    if cfg.strategy == "fedprox":
        return cls(**common, proximal_mu=cfg.proximal_mu)
    if cfg.strategy in ("fedadam", "fedyogi", "fedadagrad"):
        return cls(**common, eta=cfg.server_lr, eta_l=cfg.stage_lr)
    if cfg.strategy == "fedavgm":
        return cls(**common, server_learning_rate=1.0, server_momentum=0.9)
    if cfg.strategy == "fedtrimmedavg":
        return cls(**common, beta=cfg.trimmed_beta)
    return cls(**common)
