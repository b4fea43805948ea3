"""Issue 14 item 5, faults in every phase: a simulation killed (SIGKILL, its whole process group) in
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
    cmd = [sys.executable, str(workdir / "held_simulate.py"), *"--sites 2 --patients 6 --size tiny".split()]
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


@pytest.fixture(scope="module")
def reference(workdir, tiny_federation) -> Path:
    """The uninterrupted run every killed run must end equal to."""
    assert wait(simulate(workdir, tiny_federation, "full"), timeout=900) == 0
    run_dir = workdir / "outputs" / "full"
    assert metrics_rounds(run_dir) == ROUNDS
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    ("hold", "checkpointed"),
    [("pretrain:1", ("pretrain", 1)), ("transfer", ("pretrain", 2)), ("stage:1", ("stage", 1))],
    ids=["phase1", "transfer", "phase2"],
)
def test_item5_killed_in_every_phase_resumes_to_the_same_weights(
    workdir, tiny_federation, reference, hold, checkpointed
):
    name = "killed-" + hold.replace(":", "-")
    run_dir = workdir / "outputs" / name
    assert kill_when_held(workdir, name, simulate(workdir, tiny_federation, name, hold=hold)), (
        f"the run ended before it was held at {hold}"
    )
    checkpoint = read_checkpoint(run_dir / "checkpoint.npz")
    assert (checkpoint.phase, checkpoint.completed_round) == checkpointed
    assert not (run_dir / "results.json").exists()
    assert (run_dir / "pretrain_model.npz").exists() == (hold != "pretrain:1")

    assert wait(simulate(workdir, tiny_federation, name, resume=True), timeout=900) == 0
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_item5_fedbn_site_layers_survive_a_resume(workdir, tiny_federation):
    """FedBN killed in phase 1, resumed and killed in phase 2, resumed to the end: the sites' own
    normalisation layers (kept in their cache dirs) and the weights equal an uninterrupted run's."""
    assert wait(simulate(workdir, tiny_federation, "bn-full", config="fedbn.toml"), timeout=900) == 0
    for hold in ("pretrain:1", "stage:1"):
        proc = simulate(
            workdir, tiny_federation, "bn-killed", "fedbn.toml", hold, resume=hold != "pretrain:1"
        )
        assert kill_when_held(workdir, "bn-killed", proc), f"the run ended before it was held at {hold}"
    proc = simulate(workdir, tiny_federation, "bn-killed", "fedbn.toml", resume=True)
    assert wait(proc, timeout=900) == 0
    assert_same_run(workdir / "outputs" / "bn-killed", workdir / "outputs" / "bn-full")

    sites = sorted((workdir / ".cache" / "onfh").glob("site-*"))
    assert len(sites) == 2
    for site in sites:
        for phase in ("pretrain", "stage"):
            resumed = np.load(site / "fedbn" / "bn-killed" / phase / "round-0002.npz")
            expected = np.load(site / "fedbn" / "bn-full" / phase / "round-0002.npz")
            assert resumed.files == expected.files and resumed.files
            for key in expected.files:
                np.testing.assert_allclose(resumed[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
