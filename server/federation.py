"""One federated run on the server: site inventory, federated MR-to-CT pretraining, encoder transfer,
federated staging, and a final held-out evaluation pooled from site aggregates.

Every round is checkpointed (``checkpoint.npz``); with run-config ``resume`` a run continues after
the last completed round. :mod:`server.server_app` is the thin Flower shell that calls
:func:`run_federation`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.files import save_npz_atomic
from common.models.factory import build_staging, build_translation
from common.models.transfer import load_pretrained_encoder
from common.records import from_record, to_record
from common.training.device import seed_everything
from common.training.weights import get_shared_state, set_shared_state
from server.checkpoint import (
    Checkpoint,
    read_checkpoint,
    restore_optimiser_state,
    strategy_optimiser_state,
    write_checkpoint,
)
from server.delivery import deliver, model_card
from server.privacy import PHASES, SiteLevelDP, noised_rounds, privacy_report
from server.results import RunRecorder
from server.strategies import build_strategy
from server.strategy import PhaseState

log = logging.getLogger("onfh.server")

BEST_STAGE_FILE = "best_stage_model.npz"
SETTLE_S = 2.0  # the inventory waits this long after the last node to connect  # global staging weights of the best validation round


@dataclass
class _Run:
    """What every phase of one run shares."""

    grid: Grid
    cfg: RunConfig
    history: dict
    recorder: RunRecorder
    sites: dict[int, str]  # node id -> site name

    def phase_state(self, phase: str, start: int, rounds: list) -> PhaseState:
        return PhaseState(phase, start, dict(self.sites), self.history["failures"], rounds)


def run_federation(grid: Grid, cfg: RunConfig) -> dict:
    """Both phases, checkpointed every round; returns the results written to ``cfg.run_dir``."""
    seed_everything(cfg.seed)
    recorder = RunRecorder(cfg.run_dir, cfg.to_dict(), cfg.tracking)
    resume = read_checkpoint(cfg.run_dir / "checkpoint.npz") if cfg.resume else None
    history: dict[str, Any] = resume.history if resume else {"pretrain": [], "stage": [], "failures": []}
    if resume:
        log.info("resuming %s after %s round %d", cfg.run_dir, resume.phase, resume.completed_round)
        recorder.resume_metrics(history)
    run = _Run(grid, cfg, history, recorder, {})
    history["inventory"] = _site_inventory(run)

    translation, staging = build_translation(cfg.model), build_staging(cfg.model)
    if cfg.pretrained and cfg.pretrain_rounds > 0:
        _pretrain_and_transfer(run, translation, staging, resume)

    # Phase 2: federated staging.
    stage_resume = resume if resume and resume.phase == "stage" else None
    initial = stage_resume.arrays if stage_resume else get_shared_state(staging, cfg.fedbn)
    final, final_round = _select_final(run, _run_phase(run, "stage", initial, cfg.stage_rounds, stage_resume))

    test = _final_test(run, final, final_round)
    set_shared_state(staging, final)
    results = {
        "config": cfg.to_dict(),
        "test": test,
        "history": history,
        "failures": history["failures"],
        "privacy": privacy_report(cfg, history),
        "model-bytes": {
            "pretrain": _nbytes(get_shared_state(translation, cfg.fedbn, cfg.update_dtype)),
            "stage": _nbytes(get_shared_state(staging, cfg.fedbn, cfg.update_dtype)),
        },
    }
    # Every site that took part gets the model it helped train, with its card (server/delivery.py).
    results["delivery"] = deliver(grid, cfg, run.sites, final, model_card(cfg, results, final_round))
    model_arrays = {k: v.detach().cpu().numpy() for k, v in staging.state_dict().items()}
    path = recorder.write_final(results, model_arrays)
    log.info(
        "pooled test macro AUROC %.3f over %d hips; results in %s",
        test.get("macro-auroc", float("nan")),
        int(test.get("n-hips", 0)),
        path,
    )
    recorder.close()
    return results


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _pretrain_and_transfer(
    run: _Run, translation: torch.nn.Module, staging: torch.nn.Module, resume: Checkpoint | None
) -> None:
    """Phase 1: federated MR-to-CT pretraining (or its saved result), then the encoder's transfer."""
    pretrain_path = run.cfg.run_dir / "pretrain_model.npz"
    if resume and resume.phase == "stage":
        pretrained = _load_npz(pretrain_path)
    else:
        initial = resume.arrays if resume else get_shared_state(translation, run.cfg.fedbn)
        pretrained = _run_phase(run, "pretrain", initial, run.cfg.pretrain_rounds, resume)
        save_npz_atomic(pretrain_path, pretrained)
    set_shared_state(translation, pretrained)
    loaded = load_pretrained_encoder(staging, translation.state_dict())
    log.info("transferred %d encoder tensors from the translation network", len(loaded))


def _select_final(run: _Run, last: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """The last round's weights, or with ``select-on-val`` those of the best validation round, and
    the round (under FedBN the sites test with their own layers of that round)."""
    best_path = run.cfg.run_dir / BEST_STAGE_FILE
    if not (run.cfg.select_on_val and "best-stage-round" in run.history and best_path.exists()):
        return last, run.cfg.stage_rounds
    # Model selection on the pooled validation AUROC, as the centralized trainer selects epochs.
    log.info(
        "final model: round %d (best pooled validation macro AUROC %.3f)",
        run.history["best-stage-round"],
        run.history["best-stage-val-auroc"],
    )
    return _load_npz(best_path), int(run.history["best-stage-round"])


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in arrays.values()))


def _site_inventory(run: _Run, wait_s: float = 120.0) -> dict[str, dict]:
    """Ask every connected site for its name and data counts (aggregates only)."""
    deadline = time.time() + wait_s
    nodes = list(run.grid.get_node_ids())
    while len(nodes) < run.cfg.min_sites and time.time() < deadline:
        time.sleep(1.0)
        nodes = list(run.grid.get_node_ids())
    # Sites still connecting (a busy simulation starts its nodes one by one) join the inventory if
    # they come within SETTLE_S of the last: a node asked nothing here has no name in the run.
    settled = time.time() + SETTLE_S
    while time.time() < min(settled, deadline):
        time.sleep(0.5)
        now = list(run.grid.get_node_ids())
        if len(now) > len(nodes):
            nodes, settled = now, time.time() + SETTLE_S
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"query": "inventory"})}),
            dst_node_id=n,
            message_type=MessageType.QUERY,
        )
        for n in nodes
    ]
    inventory: dict[str, dict] = {}
    # Deployment registers each site's key under its name: that name binds the node, not the reply's.
    registered = {n.node_id: getattr(n, "name", "") for n in run.grid.get_nodes()}
    for reply in run.grid.send_and_receive(messages, timeout=run.cfg.round_timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            run.history["failures"].append(
                {
                    "phase": "inventory",
                    "round": 0,
                    "step": "inventory",
                    "site": f"node-{node}",
                    "reason": reply.error.reason,
                }
            )
            log.warning("node %d did not report its inventory: %s", node, reply.error.reason)
            continue
        claimed = str(reply.content.config_records["site"]["site-name"])
        name = registered.get(node) or claimed
        if name != claimed:
            reason = f"node {node} is registered as {name!r} but its inventory reply claims {claimed!r}"
            run.history["failures"].append(
                {
                    "phase": "inventory",
                    "round": 0,
                    "step": "inventory",
                    "site": name,
                    "reason": reason,
                    "action": "flagged",
                }
            )
            log.warning("inventory: %s", reason)
        run.sites[node] = name
        inventory[name] = {k: v for k, v in next(iter(reply.content.metric_records.values())).items()}
    for name, counts in sorted(inventory.items()):
        log.info(
            "site %s: %d hips (%d labelled train), %d MR-CT pairs",
            name,
            counts["hips"],
            counts["labelled-train"],
            counts["pairs"],
        )
    return inventory


def _run_phase(
    run: _Run, phase: str, initial: dict[str, np.ndarray], total: int, resume: Checkpoint | None
) -> dict[str, np.ndarray]:
    """Rounds ``resume.completed_round + 1 .. total`` of ``phase``; the global weights after the last."""
    start = resume.completed_round if resume else 0
    if total - start <= 0:
        return initial
    cfg = run.cfg
    state = run.phase_state(phase, start, run.history[phase])

    def on_round_end(round_no: int, arrays: ArrayRecord, summary: dict) -> None:
        _round_done(run, state, strategy, round_no, from_record(arrays), summary)

    prior = sum(noised_rounds(run.history, other) for other in PHASES if other != phase)
    privacy = SiteLevelDP.for_phase(cfg, phase, prior_releases=prior)
    strategy = build_strategy(
        cfg, state, initial, on_round_end, inventory=run.history["inventory"], privacy=privacy
    )
    if resume:
        restore_optimiser_state(strategy, resume.optimiser)
    log.info(
        "phase %s: rounds %d..%d, %s over %d sites%s",
        phase,
        start + 1,
        total,
        cfg.strategy,
        len(run.sites),
        f", DP noise multiplier {privacy.noise_multiplier:g}, clip {privacy.clip_norm:g}" if privacy else "",
    )
    result = strategy.start(
        grid=run.grid,
        initial_arrays=to_record(initial),
        num_rounds=total - start,
        timeout=cfg.round_timeout_s,
        train_config=ConfigRecord({"phase": phase}),
        evaluate_config=ConfigRecord({"phase": phase, "split": "val"}),
    )
    return from_record(result.arrays) if result.arrays is not None else initial


def _round_done(
    run: _Run,
    state: PhaseState,
    strategy: object,
    round_no: int,
    arrays: dict[str, np.ndarray],
    summary: dict,
) -> None:
    """After a round: keep the best staging weights, write the checkpoint, then the metrics line.

    The line comes last, so a kill between the two leaves it out rather than repeating it after
    the resume (which rebuilds it from the checkpoint: :meth:`RunRecorder.resume_metrics`).
    """
    score = summary.get("macro-auroc", float("nan"))
    if (
        state.phase == "stage"
        and np.isfinite(score)
        and score > run.history.get("best-stage-val-auroc", -1.0)
    ):
        save_npz_atomic(run.cfg.run_dir / BEST_STAGE_FILE, arrays)
        run.history["best-stage-round"], run.history["best-stage-val-auroc"] = round_no, float(score)
    write_checkpoint(
        run.cfg.run_dir / "checkpoint.npz",
        Checkpoint(state.phase, round_no, arrays, run.history, strategy_optimiser_state(strategy)),
    )
    entry = state.rounds[-1]
    run.recorder.round_done(state.phase, round_no, {k: v for k, v in entry.items() if k != "round"})


def _final_test(run: _Run, arrays: dict[str, np.ndarray], model_round: int) -> dict:
    """Held-out test evaluation of the final global model (that of staging round ``model_round``),
    pooled from site aggregates."""
    state = run.phase_state("stage", run.cfg.stage_rounds, [])
    strategy = build_strategy(run.cfg, state, arrays)
    config = ConfigRecord({"split": "test", "model-round": model_round})
    messages = strategy.configure_evaluate(0, to_record(arrays), config, run.grid)
    replies = run.grid.send_and_receive(messages, timeout=run.cfg.round_timeout_s)
    return strategy.pooled_evaluation(0, replies, "test")
