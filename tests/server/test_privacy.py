"""Site-level differential privacy: clipping, calibrated noise, accounting, refused settings, a real run.

The unit tests drive ``server/privacy.py`` directly and through the strategy the server builds, on
Flower's own messages (helpers of ``test_robust_rules.py``); the last test runs both phases in
Flower's simulation runtime with DP on and checks the epsilon it reports against the accountant.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.app import ConfigRecord

from common.config import RunConfig
from common.records import to_record
from server.privacy import SiteLevelDP, clip_update, epsilon, l2_norm, noise_std, privacy_report
from server.strategies import build_strategy
from server.strategy import PhaseState
from tests.server.test_robust_rules import NodeGrid, direction, reference, reply, sites
from tests.server.test_strategy_accounting import server_identity  # noqa: F401  (autouse: Flower's run identity)

DP_ON = {"dp_noise_multiplier": 1.0, "fedbn": True}


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.5, 1.0, 3.0, 1e4])
def test_a_clipped_update_never_exceeds_the_clip_norm(scale):
    rng = np.random.default_rng(int(scale * 10) + 1)
    update = {"a": scale * rng.normal(size=(5, 7)), "b": scale * rng.normal(size=11)}
    clipped, norm = clip_update(update, clip_norm=1.5)
    assert norm == pytest.approx(l2_norm(update))
    assert l2_norm(clipped) <= 1.5 * (1 + 1e-12)
    if norm <= 1.5:  # within the bound: untouched
        for k in update:
            np.testing.assert_array_equal(clipped[k], update[k])
    else:  # scaled down, direction kept
        assert l2_norm(clipped) == pytest.approx(1.5)
        np.testing.assert_allclose(clipped["a"] * norm / 1.5, update["a"])


def test_the_noise_on_the_mean_has_the_calibrated_std():
    z, clip, n = 0.8, 2.0, 4
    sent = {"w": np.zeros((400, 500), np.float32)}
    dp = SiteLevelDP("stage", z, clip, 1e-5, rng=np.random.default_rng(0))
    released, note = dp.release(sent, [dict(sent) for _ in range(n)], [], 1)  # zero updates: pure noise
    assert note["noise-std"] == noise_std(z, clip, n) == pytest.approx(z * clip / n)
    assert float(np.std(released["w"])) == pytest.approx(z * clip / n, rel=0.01)
    assert abs(float(np.mean(released["w"]))) < 0.01 * z * clip / n
    assert released["w"].dtype == np.float32


def test_the_release_is_the_mean_of_the_clipped_updates():
    rng = np.random.default_rng(3)
    sent = {"w": rng.normal(size=(6, 6)).astype(np.float32), "b": np.zeros(3, np.float32)}
    small = {"w": sent["w"] + 0.01, "b": np.full(3, 0.01, np.float32)}  # norm ~0.06: kept as sent
    large = {"w": sent["w"] + 5.0, "b": np.full(3, 5.0, np.float32)}  # norm ~31: clipped to 1
    dp = SiteLevelDP("stage", 1e-9, 1.0, 1e-5, rng=np.random.default_rng(0))
    released, note = dp.release(sent, [small, large], [], 1)
    big = 5.0 / math.sqrt(39 * 25)  # the large update scaled to norm 1, per coordinate
    np.testing.assert_allclose(released["w"], sent["w"] + (0.01 + big) / 2, atol=1e-6)
    np.testing.assert_allclose(released["b"], (0.01 + big) / 2, atol=1e-6)
    assert (note["sites"], note["clipped-sites"]) == (2, 1)


def accountant_epsilon(z: float, rounds: int, delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


def test_epsilon_is_finite_grows_with_rounds_and_matches_the_accountant():
    values = [epsilon(1.1, rounds, 1e-5) for rounds in range(1, 11)]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert values == sorted(values) and len(set(values)) == len(values)
    for rounds in (1, 4, 10):
        assert epsilon(1.1, rounds, 1e-5) == pytest.approx(accountant_epsilon(1.1, rounds, 1e-5))
    assert epsilon(2.0, 5, 1e-5) < epsilon(1.0, 5, 1e-5)  # more noise, less spent
    assert epsilon(1.0, 0, 1e-5) == 0.0 and epsilon(0.0, 3, 1e-5) == math.inf


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"dp-noise-multiplier": -1}, "'dp-noise-multiplier' = -1.0 is invalid"),
        ({"dp-clip-norm": 0}, "'dp-clip-norm' = 0.0 is invalid: use a positive L2 norm"),
        ({"dp-delta": 0}, "'dp-delta' = 0.0 is invalid"),
        ({"dp-delta": 1.5}, "'dp-delta' = 1.5 is invalid"),
        ({"dp-phases": "all"}, "'dp-phases' = 'all' is invalid: use one of both, pretrain, stage"),
        (
            {"dp-noise-multiplier": 1, "fedbn": True, "strategy": "fedmedian", "secure-aggregation": False},
            "'strategy' = 'fedmedian' is invalid: differential privacy .* works with strategy fedavg or fedprox",
        ),
        (
            {"dp-noise-multiplier": 1, "strategy": "fedadam", "fedbn": True, "secure-aggregation": False},
            "'strategy' = 'fedadam' is invalid",
        ),
        (
            {"strategy": "krum"},
            "'secure-aggregation' = True is invalid: .*strategy 'krum' cannot use; use strategy",
        ),
        ({"secagg-clip-range": 0}, "'secagg-clip-range' = 0.0 is invalid: use a positive bound"),
        ({"dp-noise-multiplier": 1, "fedbn": False}, "'norm' = 'batch' is invalid: .*set fedbn = true"),
    ],
)
def test_invalid_dp_settings_are_refused_naming_the_key(raw, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(raw)


def test_valid_dp_settings_pass():
    RunConfig.from_dict({"dp-noise-multiplier": 1, "fedbn": True, "strategy": "fedprox"})
    RunConfig.from_dict({"dp-noise-multiplier": 0.5, "norm": "group", "dp-phases": "stage"})
    assert SiteLevelDP.for_phase(RunConfig(), "stage") is None  # off by default
    cfg = RunConfig(dp_noise_multiplier=1.0, fedbn=True, dp_phases="stage")
    assert SiteLevelDP.for_phase(cfg, "pretrain") is None and SiteLevelDP.for_phase(cfg, "stage")


def test_the_strategy_aggregates_clipped_updates_and_notes_epsilon_per_round():
    """Four sites, one sending ``-10 d``: under DP it is clipped (not excluded), the rest averaged."""
    cfg = RunConfig(update_norm_factor=5.0, dp_clip_norm=1.0, secure_aggregation=False, **DP_ON)
    named, ref, d = sites(4), reference(), direction()
    state = PhaseState("stage", sites=dict(named))
    privacy = SiteLevelDP("stage", 1e-9, 1.0, 1e-5, prior_releases=2, rng=np.random.default_rng(0))
    strategy = build_strategy(cfg, state, ref, privacy=privacy)
    assert strategy.bounds.norm_factor == 0.0  # the median bound would couple the sites
    for round_no in (1, 2):
        messages = list(strategy.configure_train(round_no, to_record(ref), ConfigRecord(), NodeGrid(named)))
        replies = []
        for msg in messages:
            scale = -10.0 if msg.metadata.dst_node_id == max(named) else 0.01
            replies.append(
                reply(msg, {k: ref[k] + scale * d[k] for k in ref}, 10, named[msg.metadata.dst_node_id])
            )
        arrays, _ = strategy.aggregate_train(round_no, replies)
        note = state.rounds[-1]["privacy"]
        assert (note["sites"], note["clipped-sites"], note["releases"]) == (4, 1, round_no)
        assert note["epsilon-phase"] == pytest.approx(accountant_epsilon(1e-9, round_no, 1e-5))
        assert note["epsilon-run"] == pytest.approx(accountant_epsilon(1e-9, 2 + round_no, 1e-5))
    norm_d = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))
    assert 0.01 * norm_d < 1.0  # the honest updates are within the clip: kept as sent
    for k in ref:  # -10 d clipped to norm 1, averaged with three honest 0.01 d
        expected = ref[k] + (3 * 0.01 * d[k] - d[k] / norm_d) / 4
        np.testing.assert_allclose(arrays[k].numpy(), expected, atol=1e-5)
    assert state.failures == []  # clipped, not excluded


def test_the_results_block_composes_the_phases():
    history = {
        "pretrain": [{"round": 1, "privacy": {}}, {"round": 2, "privacy": {}}],
        "stage": [{"round": r, "privacy": {}} for r in (1, 2, 3)],
    }
    block = privacy_report(RunConfig(dp_noise_multiplier=1.3, fedbn=True), history)
    assert block["enabled"] and block["delta"] == 1e-5 and "site" in block["unit"]
    assert block["pretrain"]["epsilon"] == pytest.approx(accountant_epsilon(1.3, 2, 1e-5))
    assert block["stage"]["epsilon"] == pytest.approx(accountant_epsilon(1.3, 3, 1e-5))
    assert block["epsilon-total"] == pytest.approx(accountant_epsilon(1.3, 5, 1e-5))
    stage_only = privacy_report(RunConfig(dp_noise_multiplier=1.3, fedbn=True, dp_phases="stage"), history)
    assert stage_only["pretrain"]["epsilon"] is None and stage_only["epsilon-total"] is None
    assert "pretrain" in stage_only["not-covered"]
    assert privacy_report(RunConfig(), history) == {"enabled": False, "noise-multiplier": 0.0}


@pytest.mark.slow
def test_a_federation_with_dp_reports_epsilon_per_phase_and_round(tiny_federation, tmp_path):
    """Both phases in Flower's simulation runtime with DP: results.json, metrics.jsonl and the log agree."""
    from simulation.main_job import run_federated
    from tests.server.test_federation import tiny_config

    z, delta = 1.5, 1e-5
    cfg = tiny_config(
        tiny_federation, tmp_path, run_name="dp", stage_rounds=2, dp_noise_multiplier=z, fedbn=True
    )
    results = run_federated(cfg, n_sites=2)
    assert results["failures"] == [], results["failures"]
    block = results["privacy"]
    assert block["pretrain"]["rounds"] == block["pretrain"]["noised-rounds"] == 1
    assert block["stage"]["rounds"] == block["stage"]["noised-rounds"] == 2
    for phase, rounds in (("pretrain", 1), ("stage", 2)):
        assert math.isfinite(block[phase]["epsilon"])
        assert block[phase]["epsilon"] == pytest.approx(accountant_epsilon(z, rounds, delta))
    assert block["epsilon-total"] == pytest.approx(accountant_epsilon(z, 3, delta))
    lines = [json.loads(t) for t in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [line["privacy"]["epsilon-run"] for line in lines]
    assert logged == pytest.approx([accountant_epsilon(z, r, delta) for r in (1, 2, 3)])
    assert logged == sorted(logged)
    log_text = (cfg.run_dir / "server.log").read_text()
    assert log_text.count("] DP: ") == 3 and "run so far" in log_text
    final = np.load(cfg.run_dir / "final_model.npz")
    assert all(np.isfinite(final[k]).all() for k in final.files)
