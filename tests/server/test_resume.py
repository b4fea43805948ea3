"""Faults in every phase: a simulation killed (SIGKILL, its whole process group) in
phase 1, at the transfer or in phase 2 resumes to the weights of an uninterrupted run of the same
seed, with one metrics.jsonl line per (phase, round); a FedBN run keeps its sites' own layers.

Each killed run is held asleep at a precise point of the server (right after a checkpoint is on disk,
before that round's metrics line; or right after the encoder's transfer) by a small launcher that
wraps ``onfh simulate``, then killed there: no race with the rounds, which take about a second.
"""

from __future__ import annotations

import json
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
pretrain-rounds = 2
pretrain-max-pairs = 64
stage-rounds = 2
stage-epochs = 1
histogram-bins = 200
"""
ROUNDS = [("pretrain", 1), ("pretrain", 2), ("stage", 1), ("stage", 2)]
LAUNCHER = '''"""onfh simulate, held asleep at one point of the server (ONFH_TEST_HOLD) so a test can kill it there."""
import os
import sys
import time
from pathlib import Path


def hold(point):
    if os.environ.get("ONFH_TEST_HOLD") == point:
        Path(os.environ["ONFH_TEST_HELD"]).write_text(point)
        time.sleep(3600)


if __name__ == "__main__":
    import server.federation as fed
    from simulation.main_job import main

    write_checkpoint, load_pretrained_encoder = fed.write_checkpoint, fed.load_pretrained_encoder

    def held_write_checkpoint(path, checkpoint):
        write_checkpoint(path, checkpoint)  # on disk; the round's metrics line is not written yet
        hold(f"{checkpoint.phase}:{checkpoint.completed_round}")

    def held_transfer(staging, state):
        loaded = load_pretrained_encoder(staging, state)  # phase 1 is over; phase 2 has not begun
        hold("transfer")
        return loaded

    fed.write_checkpoint, fed.load_pretrained_encoder = held_write_checkpoint, held_transfer
    sys.exit(main(sys.argv[1:]))
'''


def simulate(
    workdir: Path,
    federation: Path,
    run_name: str,
    config: str = "resume.toml",
    hold: str = "",
    resume: bool = False,
) -> subprocess.Popen:
    """``onfh simulate`` on the tiny federation in its own process group (so it can be killed whole),
    held at ``hold`` (``PHASE:ROUND`` after that checkpoint, or ``transfer``) when given."""
    # --difficulty easy: the session's tiny federation as written (another would be regenerated).
    args = "--sites 2 --patients 6 --size tiny --difficulty easy"
    cmd = [sys.executable, str(workdir / "held_simulate.py"), *args.split()]
    cmd += ["--data", str(federation), "--config", str(workdir / config), "--run-name", run_name]
    cmd += ["--no-baselines", "--resume"] if resume else ["--no-baselines"]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ONFH_TEST_HOLD": hold,
        "ONFH_TEST_HELD": str(workdir / f"{run_name}.held"),
    }
    log = open(workdir / f"{run_name}-{hold or 'end'}-{int(resume)}.log", "w")  # noqa: SIM115 - closed at exit
    return subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def kill_when_held(workdir: Path, run_name: str, proc: subprocess.Popen, timeout: float = 900) -> bool:
    """SIGKILL the run's whole process group once it is held; False if it ended first."""
    held = workdir / f"{run_name}.held"
    held.unlink(missing_ok=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not held.exists():
        time.sleep(0.2)
    was_held = held.exists()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    held.unlink(missing_ok=True)
    return was_held


def metrics_rounds(run_dir: Path) -> list[tuple[str, int]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(line["phase"], line["round"]) for line in lines]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same final weights (the tolerance of the original resume test) and the same validation metrics."""
    resumed, expected = np.load(run_dir / "final_model.npz"), np.load(reference / "final_model.npz")
    assert resumed.files == expected.files
    for key in expected.files:
        np.testing.assert_allclose(resumed[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    history = json.loads((run_dir / "results.json").read_text())["history"]
    reference_history = json.loads((reference / "results.json").read_text())["history"]
    for phase, key in (("pretrain", "mae-hu"), ("stage", "macro-auroc")):
        assert [r["round"] for r in history[phase]] == [r["round"] for r in reference_history[phase]]
        got = [r["evaluate"][key] for r in history[phase]]
        want = [r["evaluate"][key] for r in reference_history[phase]]
        np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"{phase} validation {key}")
    assert metrics_rounds(run_dir) == ROUNDS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One folder for every run of this module, so the sites' caches are built once."""
    path = tmp_path_factory.mktemp("resume")
    (path / "resume.toml").write_text(CONFIG)
    (path / "fedbn.toml").write_text(CONFIG + "fedbn = true\n")
    (path / "held_simulate.py").write_text(LAUNCHER)
    return path


@pytest.mark.slow
def test_item5_killed_in_every_phase_resumes_to_the_same_weights_and_site_layers(workdir, tiny_federation):
    """One FedBN run killed in phase 1, resumed and killed at the transfer, resumed and killed in
    phase 2, then resumed to the end: its weights, validation metrics and metrics.jsonl equal an
    uninterrupted run's, and so do the sites' own normalisation layers (kept in their cache dirs).

    FedBN is the harder case (site state outside the server's checkpoint); one chain of kills keeps
    the number of simulations at five, so the suite stays within CI's time.
    """
    assert wait(simulate(workdir, tiny_federation, "full", config="fedbn.toml"), timeout=900) == 0
    reference = workdir / "outputs" / "full"
    assert metrics_rounds(reference) == ROUNDS
    run_dir = workdir / "outputs" / "killed"
    for hold, checkpointed in (
        ("pretrain:1", ("pretrain", 1)),
        ("transfer", ("pretrain", 2)),
        ("stage:1", ("stage", 1)),
    ):
        proc = simulate(workdir, tiny_federation, "killed", "fedbn.toml", hold, resume=hold != "pretrain:1")
        assert kill_when_held(workdir, "killed", proc), f"the run ended before it was held at {hold}"
        checkpoint = read_checkpoint(run_dir / "checkpoint.npz")
        assert (checkpoint.phase, checkpoint.completed_round) == checkpointed, hold
        assert not (run_dir / "results.json").exists()
        assert (run_dir / "pretrain_model.npz").exists() == (hold != "pretrain:1")
    assert wait(simulate(workdir, tiny_federation, "killed", "fedbn.toml", resume=True), timeout=900) == 0
    assert_same_run(run_dir, reference)

    # The sites' cache folders (not their ledgers, nor the folders of the models delivered to them).
    sites = sorted(
        p
        for p in (workdir / ".cache" / "onfh").glob("site-*")
        if p.is_dir() and not p.name.endswith("-models")
    )
    assert len(sites) == 2
    for site in sites:
        for phase in ("pretrain", "stage"):
            resumed = np.load(site / "fedbn" / "killed" / phase / "round-0002.npz")
            expected = np.load(site / "fedbn" / "full" / phase / "round-0002.npz")
            assert resumed.files == expected.files and resumed.files
            for key in expected.files:
                np.testing.assert_allclose(resumed[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
