"""Checkpoints are atomic and round-trip the model, the history and the server optimiser."""

import numpy as np
import pytest

from server.checkpoint import (
    Checkpoint,
    read_checkpoint,
    restore_optimiser_state,
    strategy_optimiser_state,
    write_checkpoint,
)


def test_round_trip(tmp_path):
    path = tmp_path / "run" / "checkpoint.npz"
    arrays = {"encoder.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    history = {"stage": [{"round": 1, "train": {"loss": 0.5}}], "failures": []}
    write_checkpoint(path, Checkpoint("stage", 1, arrays, history, {"m_t/encoder.w": np.ones((2, 3))}))
    loaded = read_checkpoint(path)
    assert (loaded.phase, loaded.completed_round, loaded.history) == ("stage", 1, history)
    np.testing.assert_array_equal(loaded.arrays["encoder.w"], arrays["encoder.w"])
    assert list(loaded.optimiser) == ["m_t/encoder.w"]
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.npz"]  # no temp file left


def test_overwrite_keeps_a_single_file(tmp_path):
    path = tmp_path / "checkpoint.npz"
    for r in range(3):
        write_checkpoint(path, Checkpoint("pretrain", r, {"w": np.full(2, r, np.float32)}))
    assert read_checkpoint(path).completed_round == 2
    assert len(list(tmp_path.iterdir())) == 1


def test_missing_and_corrupt_checkpoints_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="delete it to start over"):
        read_checkpoint(bad)


class _Strategy:
    def __init__(self):
        self.m_t = {"w": np.ones(2)}
        self.v_t = {"w": np.full(2, 2.0)}
        self.momentum_vector = [np.zeros(3), np.ones(1)]


def test_optimiser_state_round_trip():
    source, target = _Strategy(), _Strategy()
    target.m_t = target.v_t = target.momentum_vector = None
    restore_optimiser_state(target, strategy_optimiser_state(source))
    np.testing.assert_array_equal(target.v_t["w"], source.v_t["w"])
    assert [a.shape for a in target.momentum_vector] == [(3,), (1,)]
