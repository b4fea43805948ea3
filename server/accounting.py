"""Per-round accounting of the federation: bytes on the wire, server times, and pooled evaluations.

Each round's entry (``PhaseState.rounds``, hence ``metrics.jsonl`` and ``results.json``) holds site
names, byte counts and times only, never patient data:

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
  ``train-seconds`` (its local training, data loading included); ``update-norms``: the L2 norm of
  each site's training update (its weights minus those sent), and ``update-norm-median`` where the
  norm bound applied (:mod:`server.bounds`);
- ``withheld``: per step (e.g. ``evaluate-received``), the sites whose evaluation reply was withheld by
  their own policy (fewer hips than its ``min-release-hips``: the reply carries no metric at all).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from common.training.evaluation import pool_histograms, pooled_staging_metrics


def tensor_bytes(record: ArrayRecord) -> int:
    """Bytes of the tensors an ArrayRecord carries, in their dtype as sent (sum of ``nbytes``)."""
    return int(
        sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values())
    )


def is_withheld(msg: Message) -> bool:
    """Whether a reply is a site's withheld evaluation: ``withheld`` set and nothing else released."""
    if not msg.has_content() or not msg.content.metric_records:
        return False
    return bool(next(iter(msg.content.metric_records.values())).get("withheld", 0))


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


@dataclass
class RoundClock:
    """The server's time marks in one round: a Unix start, then ``perf_counter`` readings (None: not yet)."""

    started: float | None = None  # Unix time configure_train was entered, for the round's entry
    train_begun: float | None = None  # configure_train entered
    train_sent: float | None = None  # training messages built and handed to Flower
    evaluate_begun: float | None = None  # configure_evaluate entered

    @classmethod
    def for_training(cls) -> RoundClock:
        """A clock started now, as configure_train begins a round."""
        return cls(started=time.time(), train_begun=time.perf_counter())


@dataclass
class RoundAccount:
    """Bytes and times of the round in progress; its dicts become part of the round's entry."""

    clock: RoundClock = field(default_factory=RoundClock)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    message_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    site_train_seconds: dict[str, float] = field(default_factory=dict)
    update_norms: dict[str, float] = field(default_factory=dict)  # site -> L2 norm of its training update
    update_norm_median: float | None = None  # set when the norm bound applied (3+ replies)
    withheld: dict[str, list[str]] = field(default_factory=dict)  # step -> sites whose reply was withheld

    def tally(self, key: str, site: str, msg: Message) -> None:
        """Record the bytes of one message under ``key`` (e.g. ``train-sent``) for ``site``, and
        whether it is a withheld evaluation."""
        tensors, records = message_bytes(msg)
        self.bytes.setdefault(key, {})[site] = tensors
        self.message_bytes.setdefault(key, {})[site] = records
        if is_withheld(msg):
            self.withheld.setdefault(key, []).append(site)

    def train_done(self, replies_in: float) -> None:
        """Times of the training step, ``replies_in`` being the ``perf_counter`` reading as replies came in."""
        done, clock = time.perf_counter(), self.clock
        if clock.train_begun is not None:
            self.seconds["train"] = done - clock.train_begun
            self.seconds["train-wait"] = replies_in - (clock.train_sent or clock.train_begun)
        self.seconds["aggregate"] = done - replies_in

    def evaluate_done(self) -> float:
        """Times of the evaluation step and of the whole round; returns the ``perf_counter`` reading."""
        done, clock = time.perf_counter(), self.clock
        if clock.evaluate_begun is not None:
            self.seconds["evaluate"] = done - clock.evaluate_begun
        if clock.train_begun is not None:
            self.seconds["round"] = done - clock.train_begun
        return done

    def entry(self, round_no: int, train_metrics: dict, train_sites: int) -> dict:
        """The round's entry. It shares this account's dicts, so the evaluate step's figures land in it too."""
        entry: dict = {"round": round_no, "train": train_metrics, "train-sites": train_sites}
        if self.clock.started is not None:
            entry["started"] = self.clock.started
        entry["seconds"], entry["bytes"], entry["message-bytes"] = (
            self.seconds,
            self.bytes,
            self.message_bytes,
        )
        if self.site_train_seconds:
            entry["site-train-seconds"] = self.site_train_seconds
        if self.update_norms:
            entry["update-norms"] = self.update_norms
        if self.update_norm_median is not None:
            entry["update-norm-median"] = self.update_norm_median
        entry["withheld"] = self.withheld  # shared: filled by the evaluate step
        return entry


def summarise_evaluation(
    phase: str, replies: list[Message], site_of: Callable[[Message], str], withheld: list[str] | None = None
) -> dict:
    """Pool the sites' evaluation replies: sums of histograms and confusion counts (stage phase),
    example-weighted means (pretraining phase), and each site's own figures.

    A withheld reply (:func:`is_withheld`) is not pooled; its site is listed under ``withheld``
    with the sites in ``withheld`` (withheld replies the caller screened out before).
    """
    per_site: dict[str, dict] = {}
    withheld_sites = set(withheld or [])
    total = 0.0
    for msg in replies:
        if is_withheld(msg):
            withheld_sites.add(site_of(msg))
            continue
        record = next(iter(msg.content.metric_records.values()))
        per_site[site_of(msg)] = {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}
        total += float(record["num-examples"])
    summary: dict = {"num-examples": total, "sites": {}}
    if withheld_sites:
        summary["withheld"] = sorted(withheld_sites)
    if phase == "stage":
        hists = [s["score-histogram"] for s in per_site.values() if "score-histogram" in s]
        confs = [np.asarray(s["confusion"], dtype=np.float64) for s in per_site.values() if "confusion" in s]
        if hists:
            pooled = pool_histograms(hists)
            summary.update(pooled_staging_metrics(pooled, sum(confs)))
            summary["score-histogram"] = pooled.ravel().tolist()
        else:  # no site released an evaluation: nothing pooled, said as such
            summary.update({"macro-auroc": float("nan"), "n-hips": 0.0})
        for name, s in per_site.items():
            summary["sites"][name] = {k: v for k, v in s.items() if not isinstance(v, list)}
    else:
        for key in ("mae-hu", "psnr", "ssim"):
            if total > 0:
                summary[key] = (
                    sum(float(s.get(key, 0.0)) * float(s["num-examples"]) for s in per_site.values()) / total
                )
        summary["sites"] = per_site
    return summary


def summarise_sums(phase: str, sums: dict, sites: list[str]) -> dict:
    """The evaluation summary from a secure aggregate (:func:`common.secagg.evaluation_sums`): the
    pooled figures only; ``secure-aggregation`` lists the sites in the sum (no site's own figures exist)."""
    summary: dict = {
        "num-examples": float(sums["num-examples"]),
        "sites": {},
        "secure-aggregation": {"sites": sites},
    }
    if phase == "stage":
        hist = np.asarray(sums["score-histogram"], np.float64)
        if hist.sum() > 0:
            summary.update(pooled_staging_metrics(hist, np.asarray(sums["confusion"], np.float64)))
            summary["score-histogram"] = hist.ravel().tolist()
        else:
            summary.update({"macro-auroc": float("nan"), "n-hips": 0.0})
    else:
        summary.update({k: v for k, v in sums.items() if k != "num-examples"})
    return summary


def short_reason(reason: str, limit: int = 300) -> str:
    """The useful line of an error reply (Flower/Ray wrap a site's error in tracebacks)."""
    found = re.search(r"site [\w.-]+: [^\n'\\]+", reason)
    text = found.group(0) if found else reason.strip().splitlines()[-1] if reason.strip() else "unknown error"
    return text[:limit]
