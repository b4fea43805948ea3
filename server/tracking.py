"""Optional experiment tracking: a run's aggregate metrics, round by round, in a local TensorBoard store.

Run config ``tracking = "tensorboard"`` (extra ``pip install -e '.[tracking]'``) writes event files
under ``<run dir>/tensorboard``; ``tensorboard --logdir outputs`` then compares runs side by side.
Only what the server already records goes there: pooled and per-site aggregates, bytes, seconds.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TRACKERS = ("none", "tensorboard")


def numeric_leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(slash/joined/path, value)`` for every finite number in nested dicts (lists are skipped)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numeric_leaves(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(tree, bool):
        return
    elif isinstance(tree, int | float) and math.isfinite(tree):
        yield prefix, float(tree)


class TensorBoardTracker:
    """Writes each round's entry as scalars ``<phase>/<metric path>`` at step = round."""

    def __init__(self, run_dir: Path) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError(
                "run config 'tracking' = 'tensorboard' needs TensorBoard: pip install -e '.[tracking]' "
                "(or set tracking = 'none')"
            )
        from torch.utils.tensorboard import SummaryWriter

        self.directory = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.directory))

    def round(self, phase: str, round_no: int, entry: dict) -> None:
        for tag, value in numeric_leaves(entry):
            self.writer.add_scalar(f"{phase}/{tag}", value, global_step=round_no)
        self.writer.flush()

    def final(self, test: dict) -> None:
        for tag, value in numeric_leaves(test):
            self.writer.add_scalar(f"test/{tag}", value, global_step=0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(kind: str, run_dir: Path) -> TensorBoardTracker | None:
    """The tracker run config ``tracking`` names, or None for ``"none"``."""
    if kind not in TRACKERS:
        raise ValueError(f"run config 'tracking' = {kind!r} is invalid: use one of {', '.join(TRACKERS)}")
    return TensorBoardTracker(run_dir) if kind == "tensorboard" else None
