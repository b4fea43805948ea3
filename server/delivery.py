"""Model delivery: at the end of a run every site that took part receives the final model and its
model card (a ``deliver`` query; each site writes them into its own folder, :mod:`client.delivery`).

The card (:mod:`common.model_card`) holds the run's settings, the sites' names and inventory
counts, the pooled test figures and the model's scope: nothing that identifies a patient.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.model_card import CI_METHOD, INTENDED_USE, KNOWN_LIMITS
from common.records import to_record
from common.training.evaluation import histogram_intervals

log = logging.getLogger("onfh.server")

STAGES = ("I", "II", "III", "IV")
CARD_METRICS = ("macro-auroc", "auroc-stage-1", "auroc-stage-2", "auroc-stage-3", "auroc-stage-4",
                "accuracy", "balanced-accuracy", "qw-kappa")  # fmt: skip


def model_card(cfg: RunConfig, results: dict, model_round: int) -> dict:
    """The card of a run's final model, from its settings and results (counts and figures only)."""
    test, privacy = results.get("test", {}), results.get("privacy", {})
    confusion = np.asarray(test.get("confusion", [0] * 16), dtype=float).reshape(4, 4)
    # Undefined figures (NaN, or -1 for a stage absent from the test hips) are left out.
    metrics: dict = {"test hips": int(test.get("n-hips", 0))}
    metrics.update(
        {k: float(test[k]) for k in CARD_METRICS if isinstance(test.get(k), int | float) and test[k] >= 0}
    )
    metrics.update(
        {f"test hips, stage {s}": int(n) for s, n in zip(STAGES, confusion.sum(axis=1), strict=True)}
    )
    intervals = histogram_intervals(test["score-histogram"]) if test.get("score-histogram") else {}
    return {
        "model": "ONFH staging (ARCO I-IV) from five MR protocols",
        "intended-use": INTENDED_USE,
        "run": {
            "name": cfg.run_name,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "strategy": cfg.strategy + (" + FedBN" if cfg.fedbn else ""),
            "pretrain-rounds": cfg.pretrain_rounds if cfg.pretrained else 0,
            "stage-rounds": cfg.stage_rounds,
            "model-round": model_round,
            "secure-aggregation": cfg.secure_aggregation,
            "dp-epsilon": privacy.get("epsilon-total") if privacy.get("enabled") else None,
            "dp-delta": cfg.dp_delta,
        },
        "sites": {name: dict(counts) for name, counts in sorted(results["history"]["inventory"].items())},
        "preprocessing": json.dumps(asdict(cfg.preprocess), sort_keys=True),
        "model-settings": json.dumps(asdict(cfg.model), sort_keys=True, default=str),
        "metrics": metrics,
        "metrics-ci95": {k: list(v) for k, v in intervals.items() if k in metrics},
        "metrics-ci95-method": CI_METHOD,
        "known-limits": list(KNOWN_LIMITS),
    }


def deliver(
    grid: Grid, cfg: RunConfig, sites: dict[int, str], arrays: dict[str, np.ndarray], card: dict
) -> dict:
    """Send the final model and its card to every site of the run; ``{"sites": [...], "failed": {...}}``."""
    messages = [
        Message(
            RecordDict(
                {
                    "config": ConfigRecord({"query": "deliver", "card": json.dumps(card)}),
                    "arrays": to_record(arrays),
                }
            ),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in sorted(sites)
    ]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout_s))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    done, failed = [], {}
    for reply in replies:
        name = sites.get(sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id), "unknown")
        if reply.has_error():
            failed[name] = (
                reply.error.reason.strip().splitlines()[-1][:300] if reply.error.reason.strip() else "error"
            )
        else:
            done.append(name)
    for name in set(sites.values()) - set(done) - set(failed):
        failed[name] = "no reply before the round timeout"
    log.info(
        "final model delivered to %d of %d sites%s",
        len(done),
        len(sites),
        f"; not to {sorted(failed)}" if failed else "",
    )
    return {"sites": sorted(done), "failed": failed}
