"""The ServerApp: federated MR-to-CT pretraining, encoder transfer, federated staging."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.device import seed_everything
from common.models.factory import build_staging, build_translation
from common.models.transfer import load_pretrained_encoder
from common.run_config import RunConfig
from common.weights import get_shared_state, set_shared_state
from server.checkpoint import (
    Checkpoint,
    read_checkpoint,
    restore_optimiser_state,
    save_atomic,
    strategy_optimiser_state,
    write_checkpoint,
)
from server.records import from_record, to_record
from server.results import RunRecorder
from server.strategy import PhaseState, build_strategy, summarise_evaluation

log = logging.getLogger("onfh.server")


def run_federation(grid: Grid, cfg: RunConfig) -> dict:
    """Both phases, checkpointed every round; returns the results written to ``cfg.run_dir``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    seed_everything(cfg.seed)
    recorder = RunRecorder(cfg.run_dir, cfg.to_dict())
    checkpoint_path = cfg.run_dir / "checkpoint.npz"
    resume = read_checkpoint(checkpoint_path) if cfg.resume else None
    if resume:
        log.info("resuming %s from %s round %d", cfg.run_dir, resume.phase, resume.completed_round)
    history: dict[str, Any] = resume.history if resume else {"pretrain": [], "stage": [], "failures": []}
    n_nodes = len(list(grid.get_node_ids()))

    translation = build_translation(cfg.model)
    staging = build_staging(cfg.model)

    # Phase 1: federated MR-to-CT pretraining, then transfer of the encoder.
    if cfg.pretrained and cfg.pretrain_rounds > 0:
        pretrain_path = cfg.run_dir / "pretrain_model.npz"
        if resume and resume.phase == "stage":
            with np.load(pretrain_path) as data:
                pretrained = {k: data[k] for k in data.files}
        else:
            start = resume.completed_round if resume else 0
            initial = resume.arrays if resume else get_shared_state(translation, cfg.fedbn)
            pretrained = _run_phase(
                grid, cfg, "pretrain", initial, start, cfg.pretrain_rounds, history, recorder, n_nodes, resume
            )
            save_atomic(pretrain_path, pretrained)
        set_shared_state(translation, pretrained)
        loaded = load_pretrained_encoder(staging, translation.state_dict())
        log.info("transferred %d encoder tensors from the translation network", len(loaded))

    # Phase 2: federated staging.
    stage_resume = resume if resume and resume.phase == "stage" else None
    start = stage_resume.completed_round if stage_resume else 0
    initial = stage_resume.arrays if stage_resume else get_shared_state(staging, cfg.fedbn)
    final = _run_phase(
        grid, cfg, "stage", initial, start, cfg.stage_rounds, history, recorder, n_nodes, stage_resume
    )

    # Held-out test evaluation of the final global model, pooled from site aggregates.
    test = _final_test(grid, cfg, final, history, n_nodes)
    set_shared_state(staging, final)
    model_arrays = {k: v.detach().cpu().numpy() for k, v in staging.state_dict().items()}
    results = {
        "config": cfg.to_dict(),
        "test": test,
        "history": history,
        "failures": history["failures"],
        "bytes-per-round": {
            "pretrain-model": int(
                sum(v.nbytes for v in get_shared_state(translation, cfg.fedbn, cfg.update_dtype).values())
            ),
            "stage-model": int(
                sum(v.nbytes for v in get_shared_state(staging, cfg.fedbn, cfg.update_dtype).values())
            ),
        },
    }
    path = recorder.write_final(results, model_arrays)
    log.info(
        "pooled test macro AUROC %.3f over %d hips; results in %s",
        test.get("macro-auroc", float("nan")),
        int(test.get("n-hips", 0)),
        path,
    )
    recorder.close()
    return results


def _run_phase(
    grid: Grid,
    cfg: RunConfig,
    phase: str,
    initial: dict[str, np.ndarray],
    start: int,
    total: int,
    history: dict,
    recorder: RunRecorder,
    n_nodes: int,
    resume: Checkpoint | None,
) -> dict[str, np.ndarray]:
    if total - start <= 0:
        return initial
    strategy = build_strategy(cfg, n_nodes)
    state = PhaseState(phase=phase, round_offset=start, failures=history["failures"], rounds=history[phase])
    if resume:
        restore_optimiser_state(strategy, resume.optimiser)

    def on_round_end(round_no: int, arrays: ArrayRecord, summary: dict) -> None:
        entry = state.rounds[-1]
        recorder.round_done(phase, round_no, {k: v for k, v in entry.items() if k != "round"})
        write_checkpoint(
            cfg.run_dir / "checkpoint.npz",
            Checkpoint(phase, round_no, from_record(arrays), history, strategy_optimiser_state(strategy)),
        )

    strategy.guard(state, initial, cfg.min_sites, on_round_end)
    log.info("phase %s: rounds %d..%d with %s on %d sites", phase, start + 1, total, cfg.strategy, n_nodes)
    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(initial),
        num_rounds=total - start,
        timeout=cfg.round_timeout_s,
        train_config=ConfigRecord({"phase": phase}),
        evaluate_config=ConfigRecord({"phase": phase, "split": "val"}),
    )
    return from_record(result.arrays) if result.arrays is not None else initial


def _final_test(
    grid: Grid, cfg: RunConfig, arrays: dict[str, np.ndarray], history: dict, n_nodes: int
) -> dict:
    strategy = build_strategy(cfg, n_nodes)
    state = PhaseState(phase="stage", round_offset=cfg.stage_rounds, failures=history["failures"], rounds=[])
    strategy.guard(state, arrays, cfg.min_sites, lambda *a: None)
    messages = strategy.configure_evaluate(0, to_record(arrays), ConfigRecord({"split": "test"}), grid)
    replies = grid.send_and_receive(messages, timeout=cfg.round_timeout_s)
    kept = strategy._screen(0, replies, "test", check_arrays=False)
    return summarise_evaluation("stage", kept, strategy._site)


def make_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is pyproject's ``[tool.flwr.app.config]`` plus ``overrides``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_dict({**dict(context.run_config), **(overrides or {})})
        run_federation(grid, cfg)

    return app


app = make_server_app()
