"""Issue 14 item 5, faults in every phase: metrics.jsonl never repeats a line after a resume.

The server writes a round's metrics line after its checkpoint; a resumed run makes the log hold
exactly one line per (phase, round) of the checkpoint, whatever a kill left behind.
"""

from __future__ import annotations

import json

import numpy as np

from server.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from server.results import RunRecorder


def entry(round_no: int) -> dict:
    return {"round": round_no, "train": {"loss": 1.0 / round_no}, "evaluate": {"macro-auroc": 0.5}}


def lines(recorder: RunRecorder) -> list[dict]:
    return [json.loads(line) for line in recorder.metrics_path.read_text().splitlines()]


def test_item5_metrics_resume_drops_repeats_and_lines_beyond_the_checkpoint(tmp_path):
    recorder = RunRecorder(tmp_path, {})
    try:
        for phase, round_no in [("pretrain", 1), ("pretrain", 2), ("stage", 1), ("stage", 1), ("stage", 2)]:
            recorder.round_done(phase, round_no, {k: v for k, v in entry(round_no).items() if k != "round"})
        with recorder.metrics_path.open("a") as handle:
            handle.write('{"phase": "stage", "round": 3, "ti')  # a line cut short by the kill
        # The checkpoint holds stage round 1: the repeated line and everything after it go.
        history = {"pretrain": [entry(1), entry(2)], "stage": [entry(1)], "failures": []}
        write_checkpoint(tmp_path / "checkpoint.npz", Checkpoint("stage", 1, {"w": np.zeros(2)}, history))
        recorder.resume_metrics(read_checkpoint(tmp_path / "checkpoint.npz").history)
        got = lines(recorder)
        assert [(line["phase"], line["round"]) for line in got] == [
            ("pretrain", 1),
            ("pretrain", 2),
            ("stage", 1),
        ]
        recorder.round_done("stage", 2, {"train": {"loss": 0.5}})
        assert [(line["phase"], line["round"]) for line in lines(recorder)][-2:] == [
            ("stage", 1),
            ("stage", 2),
        ]
    finally:
        recorder.close()


def test_item5_metrics_resume_rebuilds_a_line_the_kill_left_out(tmp_path):
    """Killed after the checkpoint of pretrain round 2, before its line: the line comes from the history."""
    recorder = RunRecorder(tmp_path, {})
    try:
        recorder.round_done("pretrain", 1, {"train": {"loss": 1.0}})
        history = {"pretrain": [entry(1), entry(2)], "stage": [], "failures": []}
        recorder.resume_metrics(history)
        got = lines(recorder)
        assert [(line["phase"], line["round"]) for line in got] == [("pretrain", 1), ("pretrain", 2)]
        assert got[0]["train"] == {"loss": 1.0}  # kept as it was written
        assert got[1]["train"] == {"loss": 0.5} and got[1]["evaluate"] == {"macro-auroc": 0.5}
        assert "time" in got[1]
    finally:
        recorder.close()


def test_item5_metrics_resume_leaves_a_sound_log_alone(tmp_path):
    recorder = RunRecorder(tmp_path, {})
    try:
        recorder.round_done("pretrain", 1, {"train": {"loss": 1.0}})
        before = recorder.metrics_path.read_bytes()
        recorder.resume_metrics({"pretrain": [entry(1)], "stage": []})
        assert recorder.metrics_path.read_bytes() == before
    finally:
        recorder.close()
