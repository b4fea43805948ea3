"""A run killed during phase 2 resumes from its checkpoint and ends with the same weights as an
uninterrupted run of the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
hip-slices = 4
hip-size = 32
pretrain-rounds = 1
pretrain-max-pairs = 64
stage-rounds = 3
stage-epochs = 1
histogram-bins = 200
"""


def simulate(workdir: Path, federation: Path, run_name: str, *extra: str) -> subprocess.Popen:
    """``onfh simulate`` on the tiny federation, in its own process group (so it can be killed whole)."""
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--sites", "2", "--patients", "6", "--size", "tiny",
           "--data", str(federation), "--config", str(workdir / "resume.toml"), "--run-name", run_name,
           "--no-baselines", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(workdir / f"{run_name}{'-'.join(extra)}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_federation, tmp_path):
    (tmp_path / "resume.toml").write_text(CONFIG)
    # Reference: uninterrupted.
    assert wait(simulate(tmp_path, tiny_federation, "full"), timeout=600) == 0

    # Interrupted: kill the whole process group once phase 2 has checkpointed round 1.
    proc = simulate(tmp_path, tiny_federation, "killed")
    checkpoint = tmp_path / "outputs" / "killed" / "checkpoint.npz"
    deadline = time.time() + 600
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists():
            try:
                state = read_checkpoint(checkpoint)
            except ValueError:
                state = None
            if state and state.phase == "stage" and state.completed_round >= 1:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
                break
        time.sleep(0.2)
    assert killed, "the run ended before it could be interrupted in phase 2"
    assert not (tmp_path / "outputs" / "killed" / "results.json").exists()
    interrupted_at = read_checkpoint(checkpoint).completed_round
    assert interrupted_at < 3

    assert wait(simulate(tmp_path, tiny_federation, "killed", "--resume"), timeout=600) == 0
    resumed = np.load(tmp_path / "outputs" / "killed" / "final_model.npz")
    reference = np.load(tmp_path / "outputs" / "full" / "final_model.npz")
    assert resumed.files == reference.files
    for key in reference.files:
        np.testing.assert_allclose(resumed[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)
    rounds = [r["round"] for r in __import__("json").loads(
        (tmp_path / "outputs" / "killed" / "results.json").read_text())["history"]["stage"]]
    assert rounds == [1, 2, 3]
