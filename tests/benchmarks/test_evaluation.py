"""The evaluation benchmark never mixes seeds run with other settings, and reports undefined figures as such."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import evaluation
from common.config import load_run_config

PRESET = Path(__file__).parents[2] / "presets" / "evaluation.toml"


def test_results_of_other_settings_move_aside_and_the_same_settings_continue(tmp_path):
    cfg = load_run_config(PRESET)
    now = evaluation.budget(cfg)
    assert "stage-rounds" in now and "stage-lr" in now and "fedbn" in now
    assert "seed" not in now and "data-root" not in now  # the training seed varies within one result
    out = tmp_path / "evaluation.json"
    out.write_text(json.dumps({"budget": now, "seeds": {"0": {}}}))
    assert evaluation.earlier_results(out, now)["seeds"] == {"0": {}}

    other = dict(now, **{"stage-rounds": now["stage-rounds"] + 1})
    assert evaluation.earlier_results(out, other) == {}
    assert not out.exists()
    (kept,) = tmp_path.glob("evaluation_*_other-settings.json")
    assert json.loads(kept.read_text())["seeds"] == {"0": {}}  # nothing lost


def _column(auroc, interval, sensitivity):
    return {
        "hips": 348,
        "macro-auroc": auroc,
        "ci95": {"macro-auroc": interval},
        "balanced-accuracy": 0.5,
        "qw-kappa": None,
        "ece": 0.1,
        "sensitivity": sensitivity,
    }


def test_tables_and_plot_show_undefined_figures_as_dashes_and_count_what_the_mean_used(tmp_path):
    results = {
        "seeds": {
            "0": {"pooled-patient-level": {"federated": _column(0.8, [0.77, 0.83], [0.5, None, 0.6, 0.9])}},
            "1": {
                "pooled-patient-level": {
                    "federated": _column(0.7, [0.66, 0.74], [0.5, 0.2, 0.6, 0.9]),
                    "centralized": _column(None, None, [0.1, 0.2, 0.3, 0.4]),
                }
            },
        }
    }
    rows = evaluation.table(results).splitlines()
    assert rows[-1].startswith("| mean +- SD over seeds | 0.750 +- 0.071 (n = 2) | - |")
    rates = evaluation.rates_table(results)
    assert "| 0 | federated | 0.500 | - | 0.100 | 0.50 / - / 0.60 / 0.90 |" in rates
    evaluation.plot(results, tmp_path / "docs" / "seeds.png")
    assert (tmp_path / "docs" / "seeds.png").stat().st_size > 1000
