"""The strategy comparison on the evaluation federation: presets named or refused, its table per seed
and over seeds, and no run without the FedAvg seeds it is paired with."""

from __future__ import annotations

import json

import pytest

from benchmarks import evaluation, evaluation_strategies


def test_a_preset_gives_its_run_config_changes_and_an_unknown_name_is_refused():
    assert evaluation_strategies.preset_overrides("fedprox") == {"strategy": "fedprox", "proximal_mu": 0.01}
    assert evaluation_strategies.preset_overrides("fedbn") == {"strategy": "fedavg", "fedbn": True}
    with pytest.raises(SystemExit, match="no strategy preset .*nope.toml"):
        evaluation_strategies.preset_overrides("nope")


def _run(auroc, difference):
    return {
        "macro-auroc": auroc,
        "ci95": [auroc - 0.03, auroc + 0.03],
        "sensitivity": [0.9, None, 0.5, 0.8],
        "balanced-accuracy": 0.55,
        "minus FedAvg": {"difference": difference, "ci95": [difference - 0.02, difference + 0.02], "p": 0.0},
    }


def test_the_table_pairs_each_seed_with_fedavg_and_divides_by_that_seeds_centralized_auroc():
    central = {"pooled-patient-level": {"centralized": {"macro-auroc": 0.9}}}
    evaluation_results = {"seeds": {"0": central, "1": {"pooled-patient-level": {}}}}
    results = {"strategies": {"fedbn": {"0": _run(0.81, 0.01), "1": _run(0.83, 0.03)}}}
    rows = evaluation_strategies.table(results, evaluation_results).splitlines()
    assert (
        "| fedbn | 0 | 0.810 (0.780-0.840) | +0.010 (-0.010 to +0.030), p < 0.001 | 0.900 | 0.90 / - / 0.50 / 0.80 |"
        in rows
    )
    assert "| fedbn | 1 | 0.830 (0.800-0.860) | +0.030 (+0.010 to +0.050), p < 0.001 | - |" in rows[-2]
    # Over seeds: the ratio is averaged over the seeds that have a centralized figure, and says how many.
    assert rows[-1] == "| fedbn | mean +- SD | 0.820 +- 0.014 | +0.020 +- 0.014 | 0.900 (n = 1) |  |"


def test_no_strategy_runs_without_the_fedavg_seeds_run_with_the_same_settings(tmp_path, capsys):
    stale = tmp_path / "evaluation.json"
    stale.write_text(json.dumps({"budget": {"stage-rounds": 1}, "seeds": {}}))
    argv = ["--evaluation", str(stale), "--out", str(tmp_path / "out.json")]
    assert evaluation_strategies.main(argv) == 2
    assert "run with other settings: run benchmarks.evaluation first" in capsys.readouterr().out
    current = tmp_path / "current.json"
    settings = evaluation.budget(evaluation.seed_config(0))
    current.write_text(json.dumps({"budget": settings, "seeds": {"0": {}}}))
    argv = ["--evaluation", str(current), "--out", str(tmp_path / "out.json"), "--seeds", "0", "1"]
    assert evaluation_strategies.main(argv) == 2
    assert "seeds [1] have no FedAvg run" in capsys.readouterr().out
    assert not (tmp_path / "out.json").exists()
