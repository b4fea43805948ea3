"""The rule of ``benchmarks/bench_stage_order.py`` that decides whether a candidate replaces the
default, and the paired I-II statistic it reads."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_stage_order import CANDIDATES, DEFAULT, choose, i_ii
from common.evaluate import paired_bootstrap


def run(i_ii_auroc: float, low: float = 0.05, macro: float = 0.82, swing: float = 0.01, recall: float = 0.5):
    return {
        "macro-auroc": macro,
        "adjacent-auroc": {"I-II": i_ii_auroc, "II-III": 0.8, "III-IV": 0.9},
        "I-II-minus-default": {"difference": i_ii_auroc - 0.40, "ci95": [low, 0.3], "p": 0.01},
        "swing-last-3": swing,
        "recall-stage-II-last": recall,
    }


def test_a_candidate_replaces_the_default_only_when_it_passes_every_bound():
    base = {DEFAULT: run(0.40)}
    assert choose({**base, "ordinal": run(0.55)}) == "ordinal"
    assert choose({**base, "ordinal": run(0.55), "fedbn": run(0.60)}) == "fedbn"  # the higher I-II
    assert choose({**base, "ordinal": run(0.49)}) == DEFAULT  # gains less than 0.10
    assert choose({**base, "ordinal": run(0.55, low=-0.01)}) == DEFAULT  # interval reaches zero
    assert choose({**base, "ordinal": run(0.55, macro=0.79)}) == DEFAULT  # macro AUROC 0.03 below
    assert choose({**base, "ordinal": run(0.55, swing=0.05)}) == DEFAULT  # not converged
    assert choose({**base, "ordinal": run(0.55, recall=0.1)}) == DEFAULT  # stage II collapsed
    assert set(CANDIDATES) >= {DEFAULT, "plain-fusion", "fedprox", "fedbn", "ordinal"}


def test_the_paired_i_ii_difference_reads_only_stages_i_and_ii():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 30)
    patients = np.array([f"p{i // 2}" for i in range(120)])
    noise = rng.dirichlet(np.ones(4), 120)
    ordered = noise.copy()
    ordered[labels == 1, 1] += 2.0  # stage II hips score stage II higher: I-II ordered
    ordered /= ordered.sum(1, keepdims=True)
    assert i_ii(ordered, labels) > 0.8 and abs(i_ii(noise, labels) - 0.5) < 0.2
    others = ordered.copy()
    others[labels >= 2] = rng.dirichlet(np.ones(4), int((labels >= 2).sum()))
    assert i_ii(others, labels) == i_ii(ordered, labels)  # stage III and IV hips do not count
    paired = paired_bootstrap(ordered, noise, labels, patients, reps=200, statistic=i_ii)
    assert paired["difference"] == pytest.approx(i_ii(ordered, labels) - i_ii(noise, labels))
    assert paired["ci95"][0] > 0.2 and paired["p"] < 0.05
