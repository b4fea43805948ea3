"""A whole simulated run under secure aggregation (Flower's Ray-backed simulation, both phases),
against the same run in the clear: the aggregate is FedAvg's to quantisation, and every vector the
server observes from a site is masked noise.

The clear run gives its sites a permissive policy (``min-release-hips = 1``), so that their own
evaluations are released and pooled; the secure run uses the built-in policy, which withholds a
site's own evaluation below 10 hips (each tiny site has fewer): its pooled figures come from the
masked sums alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.secagg import QUANT_LEVELS
from server import secagg as server_secagg
from simulation.main_job import run_federated
from tests.server.test_federation import tiny_config


@pytest.fixture(scope="module")
def runs(tiny_federation, tmp_path_factory):
    out = tmp_path_factory.mktemp("secure-run")
    policy = out / "permissive.toml"
    policy.write_text("[limits]\nmin-release-hips = 1\nmax-release-bins = 1000\n")
    observed: list[tuple[str, dict[int, np.ndarray]]] = []
    reveal = server_secagg.SecureSession.reveal

    def spy(self, label, masked):  # what the server holds before unmasking, copied
        observed.append((label, {node: v.copy() for node, v in masked.items()}))
        return reveal(self, label, masked)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_secagg.SecureSession, "reveal", spy)
        secure_cfg = tiny_config(tiny_federation, out, run_name="secure")
        secure = run_federated(secure_cfg, n_sites=2)
    plain_cfg = tiny_config(tiny_federation, out, run_name="plain", secure_aggregation=False)
    plain = run_federated(plain_cfg, n_sites=2, site_policy=policy)
    return secure_cfg, secure, plain_cfg, plain, observed


def test_the_secure_aggregate_is_fedavg_to_quantisation(runs):
    secure_cfg, secure, plain_cfg, plain, _ = runs
    assert secure["config"]["secure-aggregation"] and not plain["config"]["secure-aggregation"]
    # One pretraining round from the same start, same seeds: the sites' updates are the same, so
    # the aggregates differ by quantisation only (a level is 2 x clip / 2**22 per site).
    with (
        np.load(secure_cfg.run_dir / "pretrain_model.npz") as a,
        np.load(plain_cfg.run_dir / "pretrain_model.npz") as b,
    ):
        worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a.files)
    level = 2 * secure_cfg.secagg_clip_range / QUANT_LEVELS
    assert worst <= 2 * level, f"secure and plain pretraining aggregates differ by {worst:g}"
    assert not [f for f in secure["failures"] if f["site"] == "secure-aggregation"]


def test_the_pooled_evaluation_comes_from_the_masked_sums(runs):
    _, secure, _, plain, _ = runs
    # The built-in policy withholds each tiny site's own evaluation; the masked sum still pools.
    test = secure["test"]
    assert test["secure-aggregation"]["sites"] == ["site-00", "site-01"]
    assert test["sites"] == {}
    assert test["n-hips"] == plain["test"]["n-hips"] > 0
    for entry in secure["history"]["stage"]:
        assert entry["evaluate"]["n-hips"] > 0
        assert set(entry["bytes"]) >= {
            "secagg-keys-sent",
            "secagg-shares-received",
            "secagg-unmask-train-received",
            "secagg-unmask-evaluate-received",
        }


def test_every_vector_the_server_observed_is_masked_noise(runs):
    *_, observed = runs
    labels = [label for label, _ in observed]
    # Per round: the training update and the validation evaluation; then the final test.
    assert labels.count("train") == 2 and labels.count("evaluate") == 3
    for label, vectors in observed:
        assert len(vectors) == 2
        for vector in vectors.values():
            # In the clear, a training vector's values are quantisation levels below 2**22 and an
            # evaluation's are small fixed-point counts; masked, they spread over the 2**32 ring.
            assert vector.dtype == np.uint32
            assert np.mean(vector >= QUANT_LEVELS) > 0.98, label
        first, second = vectors.values()
        assert np.mean((first + second) >= QUANT_LEVELS) > 0.98  # the sum is masked too until unmasked


def test_onfh_evaluate_at_a_site_reproduces_the_federations_per_site_test_auroc(runs, tiny_federation):
    """The clear run released each site's own test evaluation (1000-bin histograms); the model the
    site received, scored by ``onfh evaluate`` on the same split of the site's own data, scores the
    same hips with the same accuracy, and the same AUROC to within the binning where it is defined."""
    from common.evaluate import evaluate, hip_scores

    _, _, plain_cfg, plain, _ = runs
    compared = 0
    for site, released in plain["test"]["sites"].items():
        folder = Path(plain_cfg.cache_dir) / f"{site}-models" / plain_cfg.run_name
        scores = hip_scores(tiny_federation / site, folder, ("test",), Path(plain_cfg.cache_dir) / site)
        report = evaluate(scores)
        assert report["hips"] == released["num-examples"] > 0
        assert report["accuracy"] == pytest.approx(released["accuracy"], abs=1e-9)  # same model, same hips
        if released.get("macro-auroc", -1) >= 0:  # defined where the site's test hips hold 2+ stages
            assert report["macro-auroc"] == pytest.approx(released["macro-auroc"], abs=0.02)
        compared += 1
    assert compared == 2


def _largest_difference(a_path: Path, b_path: Path) -> float:
    with np.load(a_path) as a, np.load(b_path) as b:
        return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a.files)


@pytest.mark.parametrize("strategy", ["fedadam"])
def test_a_server_optimiser_steps_from_the_revealed_mean_as_it_does_from_the_replies(
    runs, strategy, tiny_federation, tmp_path
):
    """FedAdam under secure aggregation: Flower's own server step, taken from the mean the masked sum
    revealed, gives the weights it gives in the clear from the replies (to quantisation), and they
    are not FedAvg's: the step was taken, not skipped."""
    secure_fedavg_cfg, *_ = runs
    secure_cfg = tiny_config(tiny_federation, tmp_path, run_name="secure-opt", strategy=strategy)
    plain_cfg = tiny_config(
        tiny_federation, tmp_path, run_name="plain-opt", strategy=strategy, secure_aggregation=False
    )
    secure = run_federated(secure_cfg, n_sites=2)
    run_federated(plain_cfg, n_sites=2)
    assert secure["config"]["strategy"] == strategy and secure["config"]["secure-aggregation"]
    assert not [f for f in secure["failures"] if f["site"] == "secure-aggregation"]
    model = "pretrain_model.npz"  # one round from the same start and seeds: the same site updates
    worst = _largest_difference(secure_cfg.run_dir / model, plain_cfg.run_dir / model)
    # Adam's step moves at most 0.1 / tau = 100 x eta_norm (< 1) per unit of the mean's change, and
    # the mean is exact to a quantisation level (2 x clip / 2**22 ~ 2e-6).
    assert worst <= 1e-5, f"secure and plain {strategy} aggregates differ by {worst:g}"
    stepped = _largest_difference(secure_cfg.run_dir / model, secure_fedavg_cfg.run_dir / model)
    assert stepped > 100 * worst + 1e-5, f"{strategy} under secure aggregation is FedAvg ({stepped:g})"
