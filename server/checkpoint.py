"""Per-round checkpoints of the global model and run state, written atomically.

One ``.npz`` file holds the arrays and a JSON blob of the run state, written with
``common.files.save_npz_atomic``, so a checkpoint is either the old one or the new one, never half
of each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.files import save_npz_atomic

STATE_KEY = "__state_json__"
OPTIMISER_PREFIX = "__optimiser__/"


@dataclass
class Checkpoint:
    """The state needed to continue a run after the last completed round."""

    phase: str  # "pretrain" or "stage"
    completed_round: int
    arrays: dict[str, np.ndarray]
    history: dict = field(default_factory=dict)
    optimiser: dict[str, np.ndarray] = field(default_factory=dict)  # server optimiser (FedAdam m/v...)


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` (.npz) atomically: arrays, optimiser moments, JSON state."""
    state = {
        "phase": checkpoint.phase,
        "completed_round": checkpoint.completed_round,
        "history": checkpoint.history,
    }
    payload = dict(checkpoint.arrays)
    payload.update({OPTIMISER_PREFIX + k: v for k, v in checkpoint.optimiser.items()})
    payload[STATE_KEY] = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    save_npz_atomic(path, payload)


def read_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint; a missing or unreadable file raises ValueError naming it and the fix."""
    if not path.is_file():
        raise ValueError(
            f"no checkpoint at {path}: start the run without resume, or give the run name it was saved under"
        )
    try:
        with np.load(path) as data:
            content = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc
    state = json.loads(content.pop(STATE_KEY).tobytes().decode())
    optimiser = {
        k[len(OPTIMISER_PREFIX) :]: content.pop(k) for k in list(content) if k.startswith(OPTIMISER_PREFIX)
    }
    return Checkpoint(
        state["phase"], int(state["completed_round"]), content, state.get("history", {}), optimiser
    )


def strategy_optimiser_state(strategy: object) -> dict[str, np.ndarray]:
    """Server-side optimiser moments of FedOpt-family / FedAvgM strategies, flattened by name."""
    out: dict[str, np.ndarray] = {}
    for attr in ("m_t", "v_t", "momentum_vector"):
        value = getattr(strategy, attr, None)
        if isinstance(value, dict):
            out.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, list):  # FedAvgM keeps a list
            out.update({f"{attr}/#{i:05d}": np.asarray(v) for i, v in enumerate(value)})
    return out


def restore_optimiser_state(strategy: object, state: dict[str, np.ndarray]) -> None:
    """Put moments saved by :func:`strategy_optimiser_state` back on ``strategy``."""
    for attr in ("m_t", "v_t", "momentum_vector"):
        values = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(attr + "/")}
        if values and all(k.startswith("#") for k in values):
            setattr(strategy, attr, [values[k] for k in sorted(values)])
        elif values:
            setattr(strategy, attr, values)
