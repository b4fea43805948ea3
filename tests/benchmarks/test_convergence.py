"""The convergence benchmark chooses on tuning data, and measures the swing it claims to."""

from __future__ import annotations

import pytest

from benchmarks import bench_convergence
from benchmarks.evaluation import EVALUATION_SEED


def test_the_convergence_benchmark_never_looks_at_the_evaluation_federation():
    assert bench_convergence.SEED != EVALUATION_SEED
    train, val, test = (float(x) for x in bench_convergence.SPLIT.split(","))
    assert val >= 0.5 and train == 0.3  # the evaluation federation's training share; large validation


def test_summary_measures_the_swing_over_the_last_rounds_and_stage_two_recall():
    aurocs = [0.70, 0.90, 0.80, 0.84, 0.78]
    recalls = [0.0, 0.1, 0.5, 0.4, 0.2]
    rounds = [
        {"round": i + 1, "evaluate": {"macro-auroc": a, "sensitivity-stage-2": r}}
        for i, (a, r) in enumerate(zip(aurocs, recalls, strict=True))
    ]
    s = bench_convergence.summarise(rounds, seconds=12.4)
    assert s["swing-last-3"] == pytest.approx(0.06)  # 0.84 - 0.78, not the 0.20 of all rounds
    assert s["mean-last-3"] == pytest.approx(0.8067, abs=1e-4)
    assert (s["best"], s["best-round"], s["last"]) == (0.90, 2, 0.78)
    assert s["recall-stage-II-last"] == 0.2 and s["seconds"] == 12


def test_the_rule_takes_the_best_stable_candidate_and_the_cheaper_when_near():
    def run(mean, swing, recall, seconds):
        return {
            "mean-last-3": mean,
            "swing-last-3": swing,
            "recall-stage-II-last": recall,
            "seconds": seconds,
        }

    runs = {
        "swinging": run(0.90, 0.05, 0.6, 100),  # best mean, but not settled
        "collapsed": run(0.89, 0.01, 0.05, 100),  # settled, but stage II lost
        "slow": run(0.85, 0.02, 0.4, 900),
        "fast": run(0.845, 0.02, 0.4, 300),  # within 0.01 of "slow": the cheaper one
        "worse": run(0.80, 0.01, 0.5, 50),
    }
    assert bench_convergence.choose(runs, tuple(runs)) == "fast"
    assert bench_convergence.choose({"swinging": runs["swinging"]}, tuple(runs)) is None
    # Only the named candidates compete: the schedules and the server optimisers are chosen apart.
    assert bench_convergence.choose(runs, ("slow", "worse")) == "slow"
    assert bench_convergence.choose(runs, ()) is None


def test_the_server_optimisers_are_chosen_apart_from_the_schedules():
    assert set(bench_convergence.SERVER_OPTIMISERS) == {"fedavgm-cosine-16x2", "fedadam-cosine-16x2"}
    assert not set(bench_convergence.SERVER_OPTIMISERS) & set(bench_convergence.SCHEDULES)
    assert "cosine-16x2" in bench_convergence.SCHEDULES
