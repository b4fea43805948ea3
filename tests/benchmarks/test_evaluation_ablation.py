"""The ablation and pretraining control on the evaluation federation: each model differs from the full
one only where its name says, the comparisons are paired with the full model, and the control's
share of the pretraining gain is computed from those paired differences."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks import evaluation_ablation as ablation
from simulation.generalisation import Scored


def test_each_variant_changes_only_what_its_name_says():
    full = ablation.variant_config(0, ablation.FULL)
    assert full == ablation.seed_config(0)  # the evaluation run of that seed is the reference
    changed = {}
    for variant in ablation.VARIANTS[1:]:
        cfg = ablation.variant_config(0, variant)
        changed[variant.slug] = {
            f.name: getattr(cfg, f.name)
            for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(full, f.name) and f.name != "run_name"
        }
        assert cfg.run_name == f"{full.run_name}-{variant.slug}"
    assert changed["plain-vgg"] == {"fusion": "plain", "pretrained": False}
    assert changed["plain-pretrained"] == {"fusion": "plain"}
    assert changed["no-pretraining"] == {"pretrained": False}
    assert changed["mr-denoise"] == {"pretrain_target": "mr-denoise"}
    blind = changed["lesion-blind-ct"]
    assert set(blind) == {"data_root", "cache_dir"} and all("lesion-blind" in v for v in blind.values())


def _scored(noise: float, patients: int = 60, seed: int = 0) -> Scored:
    """Two hips per patient, four stages; scores that are the truth plus ``noise``."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 2 * patients)
    logits = 3.0 * np.eye(4)[labels] + noise * np.random.default_rng(seed).normal(size=(2 * patients, 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return Scored(probs, labels, np.repeat([f"site-00/p{i}" for i in range(patients)], 2))


def test_differences_are_paired_with_the_full_model_and_the_control_share_follows():
    scores = {
        "full": _scored(1.0).to_json(),
        "no-pretraining": _scored(4.0, seed=1).to_json(),
        "lesion-blind-ct": _scored(2.0, seed=2).to_json(),
        "mr-denoise": _scored(4.0, seed=3).to_json(),
    }
    summary = ablation.summarise(scores, reps=100)
    assert "full minus this" not in summary["full"]
    full, none, blind = (summary[k]["macro-auroc"] for k in ("full", "no-pretraining", "lesion-blind-ct"))
    gain = summary["no-pretraining"]["full minus this"]
    assert gain["difference"] == pytest.approx(full - none) and gain["ci95"][0] > 0  # resolved
    lost = summary["lesion-blind-ct"]["full minus this"]["difference"]
    assert (
        ablation.ct_share(summary)
        == pytest.approx((full - blind) / (full - none))
        == lost / gain["difference"]
    )
    assert 0 < ablation.ct_share(summary) < 1
    assert ablation.ct_share({"no-pretraining": {"full minus this": {"difference": -0.01}}}) is None

    results = {"summaries": {"centralized": {"0": summary}}}
    rows = ablation.table(results, "centralized").splitlines()
    row = next(r for r in rows if r.startswith("| no pretraining |"))
    assert (
        f"0: {gain['difference'] * 100:+.1f} (" in row and row.split("|")[-3].strip() == "+4.7"
    )  # the paper's
    assert not any(r.startswith("| plain VGG |") for r in rows)  # a variant not run has no row
    control = ablation.control_table(results).splitlines()[-1]
    assert control.startswith("| centralized | 0 |") and control.endswith(
        f"| {ablation.ct_share(summary):.2f} |"
    )


def test_a_paired_comparison_refuses_other_hips():
    with pytest.raises(ValueError, match="same hips"):
        ablation.summarise(
            {"full": _scored(1.0).to_json(), "mr-denoise": _scored(1.0, patients=50).to_json()}, reps=10
        )
