"""The guard's rounds under secure aggregation (run config ``secure-aggregation``): a mixin of
:class:`server.strategy.GuardedStrategy`.

Each round opens a :class:`server.secagg.SecureSession` with the training messages (aggregations
``train`` and ``evaluate``); the final test opens its own. The new global weights come from the
unmasked sum of the sites' weighted updates, and the pooled evaluation from the sum of their
counts. A sum that cannot be revealed (fewer sites than the threshold) is recorded as a refusal:
the round keeps its global weights, or its evaluation pools nothing, and the run goes on.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.records import from_record, to_record
from common.secagg import (
    SecAggError,
    decode_counts,
    decode_update,
    evaluation_length,
    evaluation_scale,
    evaluation_sums,
    training_sums,
    update_layout,
)
from server.accounting import short_reason, summarise_evaluation, summarise_sums
from server.secagg import SecureSession

# Normalisation statistics travel with the weights (FedBN off) but are not weights: averaged, never stepped.
STATISTICS = (".running_mean", ".running_var")


class RevealedMean(FedAvg):
    """FedAvg's mean of the replies, or the mean a secure-aggregation session revealed.

    Listed after a Flower server optimiser (``GuardedFedAdam(..., FedAdam, RevealedMean)``), it sits
    between that class and FedAvg in the MRO: under secure aggregation the server holds the mean and
    not the replies, and Flower's own FedAvgM/FedAdam/FedYogi/FedAdagrad step from it unchanged.
    The mean is kept for :meth:`statistics_averaged`.
    """

    revealed: tuple[ArrayRecord, MetricRecord] | None = None
    _mean: dict | None = None  # this round's mean of the normalisation statistics

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        if self.revealed is None:
            mean = super().aggregate_train(server_round, replies)
        else:
            mean, self.revealed = self.revealed, None
        # The statistics' entries, apart: FedAvgM empties the mean's record as it steps.
        self._mean = {k: v for k, v in (mean[0] or {}).items() if k.endswith(STATISTICS)}
        return mean

    def statistics_averaged(self, stepped: ArrayRecord | None) -> ArrayRecord | None:
        """The optimiser's step for the weights, this round's mean for the normalisation statistics:
        momentum or Adam's scaling carries a running variance below zero (NaN in the next forward)."""
        mean, self._mean = self._mean, None
        if stepped is not None and mean is not None:
            for key, value in mean.items():
                stepped[key] = value  # in place: FedAvgM keeps this record as its current weights
        return stepped


class SecureRounds:
    """Secure-aggregation steps of the guard; it uses the guard's ``state``, ``bounds``, ``privacy``,
    ``screen``, ``_fail``, ``site_of``, ``node_of`` and ``_absolute``."""

    session: SecureSession | None = None

    def _secure(
        self, server_round: int, grid: Grid, messages: list[Message], label: str, extra: dict | None = None
    ) -> list[Message]:
        """``messages`` for the sites of this round's session, each with its own ``secagg`` record.

        The round's session (labels ``train`` and ``evaluate``) opens with the training messages; an
        evaluation outside a round (the final test) opens its own.
        """
        fresh = label == "train" or self.session is None or "evaluate" in self.session.revealed
        if fresh:
            labels = ["train", "evaluate"] if label == "train" else ["evaluate"]

            def failed(node: int, step: str, reason: str) -> None:
                site = self.state.sites.get(node, f"node-{node}")
                self._fail(server_round, step, site, f"error at the site: {short_reason(reason)}")

            def tally(key: str, node: int, msg: Message) -> None:
                self.state.account.tally(key, self.state.sites.get(node, f"node-{node}"), msg)

            nodes = [m.metadata.dst_node_id for m in messages]
            try:
                self.session = SecureSession(grid, self.timeout, failed, labels, tally=tally).open(nodes)
            except SecAggError as exc:  # too few sites to start: nothing is sent, the step has no replies
                self.session = None
                self._fail(server_round, label, "secure-aggregation", str(exc), action="refused")
                return []
        return self.session.attach(messages, label, extra=extra)

    def _max_examples(self) -> int:
        """The most examples any site's inventory reports for the phase: each site's weight in the
        masked mean is its share of this (1 where no inventory was given)."""
        caps = self.bounds.caps or {}
        return int(max(caps.values(), default=1))

    def _masked_vectors(self, server_round: int, step: str, kept: list[Message], length: int) -> dict:
        masked = {}
        for msg in kept:
            record = next(iter(msg.content.array_records.values()), None)
            vector = from_record(record).get("masked") if record is not None else None
            if vector is None or vector.dtype != np.uint32 or vector.shape != (length,):
                self._fail(
                    server_round, step, self.site_of(msg), f"reply is not a masked vector of {length} uint32"
                )
                continue
            masked[self.node_of(msg)] = vector
        return masked

    def _secure_train(
        self, server_round: int, kept: list[Message]
    ) -> tuple[ArrayRecord, MetricRecord, dict | None]:
        """The new global weights from the sum of the masked updates (FedAvg: example-weighted mean),
        the round's metrics, and its DP note (None without DP)."""
        sent = self.bounds.sent
        masked = self._masked_vectors(server_round, "train", kept, update_layout(sent))
        try:
            total = self.session.reveal("train", masked)
        except SecAggError as exc:  # the round reveals nothing; the global weights stay as they were
            self._fail(server_round, "train", "secure-aggregation", str(exc), action="refused")
            return to_record(sent), MetricRecord({"num-examples": 0.0}), None
        weight, loss, sums = training_sums(decode_update(total, len(masked), self.secagg_clip_range), sent)
        examples = sum(float(next(iter(m.content.metric_records.values()))["num-examples"]) for m in kept)
        metrics = MetricRecord({"num-examples": examples, **({"loss": loss / weight} if weight > 0 else {})})
        note = None
        if weight <= 0:
            arrays = dict(sent)
        elif self.privacy is not None:  # the sites clipped; the weights are 1 per site with data
            arrays, note = self.privacy.noise_sum(
                sent, sums, int(round(weight)), None, self.state.rounds, self._absolute(server_round)
            )
        else:
            arrays = {k: (v.astype(np.float64) + sums[k] / weight).astype(v.dtype) for k, v in sent.items()}
            if isinstance(self, RevealedMean):  # a server optimiser steps from the mean
                self.revealed = (to_record(arrays), metrics)
                stepped, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
                return self.statistics_averaged(stepped), metrics, note
        return to_record(arrays), metrics, note

    def pooled_evaluation(self, server_round: int, replies: Iterable[Message], step: str) -> dict:
        """The evaluation summary of one step's replies: from the masked sum under secure aggregation,
        else pooled from the sites' own releases (:func:`server.accounting.summarise_evaluation`)."""
        if self.secure_aggregation and self.session is None:  # refused when it opened (recorded then)
            return _not_pooled("too few sites to open a secure-aggregation session")
        kept = self.screen(server_round, replies, step, check_arrays=False)
        if not self.secure_aggregation:
            return summarise_evaluation(self.state.phase, kept, self.site_of)
        length = evaluation_length(self.state.phase, self.histogram_bins)
        masked = self._masked_vectors(server_round, step, kept, length)
        try:
            total = self.session.reveal("evaluate", masked)
        except SecAggError as exc:  # nothing is learned: said as such in the summary
            self._fail(server_round, step, "secure-aggregation", str(exc), action="refused")
            return _not_pooled(str(exc))
        scale = evaluation_scale(self.state.phase, self.histogram_bins)
        sums = evaluation_sums(self.state.phase, decode_counts(total, scale), self.histogram_bins)
        sites = sorted(self.state.sites.get(node, f"node-{node}") for node in masked)
        return summarise_sums(self.state.phase, sums, sites)


def _not_pooled(reason: str) -> dict:
    """The summary of an evaluation secure aggregation could not reveal: nothing pooled, and why."""
    refused = {"sites": [], "refused": reason}
    return {
        "num-examples": 0.0,
        "sites": {},
        "macro-auroc": float("nan"),
        "n-hips": 0.0,
        "secure-aggregation": refused,
    }
