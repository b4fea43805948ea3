"""Robust aggregation by name: each rule runs on real Flower messages with one poisoned site, and says when it cannot.

As in ``test_strategy_accounting.py``, the strategy is the one the server builds (``build_strategy``)
and the messages are Flower's own; the only stand-in is a ``Grid`` that lists the connected nodes.
Honest sites send the global weights plus a shared update ``d`` (and a little noise); the poisoned
site sends ``-10 d`` (sign-flipped, ten times larger) and claims as many examples as the others.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.config import STRATEGIES, RunConfig
from common.records import to_record
from server.robust import RobustRuleError
from server.strategies import GUARDED, build_strategy
from server.strategy import PhaseState
from tests.server.test_strategy_accounting import server_identity  # noqa: F401  (autouse: Flower's run identity)

ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


class NodeGrid(Grid):
    """Flower's Grid reduced to listing the connected nodes (all configure_* asks of it)."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)

    def set_run(self, run):
        raise AssertionError("not for configure_*")

    @property
    def run(self):
        raise AssertionError("not for configure_*")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise AssertionError("not for configure_*")

    def push_messages(self, messages):
        raise AssertionError("not for configure_*")

    def pull_messages(self, message_ids):
        raise AssertionError("not for configure_*")

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("not for configure_*")


def reference() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=8).astype(np.float32),
        "bn.running_mean": np.zeros(8, np.float32),
    }


def direction(seed: int = 1) -> dict[str, np.ndarray]:
    """The honest sites' shared update ``d`` (unit scale per coordinate)."""
    rng = np.random.default_rng(seed)
    return {k: rng.choice([-1.0, 1.0], size=v.shape).astype(np.float32) for k, v in reference().items()}


def sites(n: int) -> dict[int, str]:
    return {100 + i: f"site-{i:02d}" for i in range(n)}


def reply(msg: Message, arrays: dict, examples: float, name: str) -> Message:
    """A site's training reply as client/client_app.py builds it."""
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": examples, "loss": 0.5, "train-seconds": 1.0}),
            "site": ConfigRecord({"site-name": name}),
            "arrays": to_record(arrays),
        }
    )
    return Message(content=content, reply_to=msg)


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k]).ravel() for k in sorted(reference())])


def poisoned_round(cfg: RunConfig, n: int, scale: float = -10.0, inventory: dict | None = None):
    """One training round of ``n`` sites, the last sending ``scale x d``; returns (aggregate, state, honest mean)."""
    named = sites(n)
    state = PhaseState("stage", sites=dict(named))
    strategy = build_strategy(cfg, state, reference(), inventory=inventory)
    ref, d = reference(), direction()
    messages = list(strategy.configure_train(1, to_record(ref), ConfigRecord(), NodeGrid(named)))
    rng = np.random.default_rng(2)
    replies, honest = [], []
    for msg in messages:
        node = msg.metadata.dst_node_id
        if node == max(named):
            arrays = {k: ref[k] + scale * d[k] for k in ref}
        else:
            arrays = {
                k: ref[k] + d[k] + 0.05 * rng.standard_normal(ref[k].shape).astype(np.float32) for k in ref
            }
            honest.append(flat(arrays))
        replies.append(reply(msg, arrays, 10, named[node]))
    arrays, _ = strategy.aggregate_train(1, replies)
    return flat({k: v.numpy() for k, v in arrays.items()}), state, np.mean(honest, axis=0)


def test_every_strategy_name_has_its_guarded_class():
    assert tuple(GUARDED) == STRATEGIES
    for name in ("fedavg", *ROBUST):
        assert name in STRATEGIES
    for name in STRATEGIES:
        strategy = build_strategy(
            RunConfig(secure_aggregation=False, strategy=name), PhaseState("stage"), reference()
        )
        assert strategy.min_sites == 1, name


@pytest.mark.parametrize("rule", ROBUST)
def test_robust_rule_stays_near_the_honest_mean_where_fedavg_does_not(rule):
    n = 7 if rule == "bulyan" else 4
    size = np.sqrt(flat(direction()).size)  # ||d||
    # The norm bound would exclude the poisoned update for every rule: turn it off to test the rule.
    fedavg, _, honest = poisoned_round(
        RunConfig(secure_aggregation=False, strategy="fedavg", update_norm_factor=0), n
    )
    robust, state, honest_again = poisoned_round(
        RunConfig(secure_aggregation=False, strategy=rule, update_norm_factor=0), n
    )
    np.testing.assert_allclose(honest, honest_again)
    assert np.linalg.norm(fedavg - honest) > 1.0 * size  # FedAvg is dragged far off
    assert np.linalg.norm(robust - honest) < 0.15 * size, rule  # within the honest sites' noise
    assert state.failures == []
    assert state.rounds[-1]["train-sites"] == n


def test_trimmed_beta_default_trims_one_site_of_four_and_too_small_a_beta_is_refused():
    assert RunConfig(secure_aggregation=False).trimmed_beta * 4 >= 1
    with pytest.raises(
        RobustRuleError, match=r"trimmed-beta=0.2 trims int\(0.2 x 4\) = 0.*at least 1/4 = 0.250"
    ):
        poisoned_round(
            RunConfig(
                secure_aggregation=False, strategy="fedtrimmedavg", trimmed_beta=0.2, update_norm_factor=0
            ),
            4,
        )


@pytest.mark.parametrize(
    "rule, n, f, message",
    [
        (
            "krum",
            3,
            1,
            r"krum needs n >= f \+ 3 replies.*n=3 with num-malicious-sites f=1: lower num-malicious",
        ),
        ("multikrum", 4, 2, r"multikrum needs n >= f \+ 3.*n=4 with num-malicious-sites f=2"),
        (
            "bulyan",
            4,
            1,
            r"bulyan needs n >= 4f \+ 3 replies, but n=4 with num-malicious-sites f=1 \(needs 7\)",
        ),
    ],
)
def test_a_rule_that_cannot_work_for_the_replies_fails_the_round_naming_n_f_and_the_fix(rule, n, f, message):
    cfg = RunConfig(secure_aggregation=False, strategy=rule, num_malicious_sites=f, update_norm_factor=0)
    with pytest.raises(RobustRuleError, match=f"phase stage round 1: {message}"):
        poisoned_round(cfg, n)


def test_multikrum_averages_the_n_minus_f_best_replies():
    cfg = RunConfig(
        secure_aggregation=False, strategy="multikrum", num_malicious_sites=1, update_norm_factor=0
    )
    robust, state, honest = poisoned_round(cfg, 5)
    size = np.sqrt(flat(direction()).size)
    assert np.linalg.norm(robust - honest) < 0.05 * size  # the four honest sites, averaged
    assert state.failures == []


def test_bad_robust_settings_are_named():
    with pytest.raises(ValueError, match="'num-malicious-sites' = -1 is invalid"):
        RunConfig(secure_aggregation=False, num_malicious_sites=-1)
    with pytest.raises(ValueError, match="'update-norm-factor' = 0.5 is invalid: use a factor >= 1, or 0"):
        RunConfig(secure_aggregation=False, update_norm_factor=0.5)


@pytest.mark.slow
def test_a_robust_rule_runs_a_federation_end_to_end(tiny_federation, tmp_path):
    """Both phases in Flower's simulation runtime with the coordinate-wise median, two sites."""
    from simulation.main_job import run_federated
    from tests.server.test_federation import tiny_config

    cfg = tiny_config(
        tiny_federation, tmp_path, run_name="median", strategy="fedmedian", secure_aggregation=False
    )
    results = run_federated(cfg, n_sites=2)
    assert results["failures"] == [], results["failures"]
    history = results["history"]
    assert set(history["inventory"]) == {"site-00", "site-01"}
    for phase in ("pretrain", "stage"):
        for entry in history[phase]:
            assert set(entry["update-norms"]) <= {"site-00", "site-01"} and entry["update-norms"]
            assert all(norm > 0 for norm in entry["update-norms"].values())
            assert "update-norm-median" not in entry  # two replies: the bound needs three
    assert results["config"]["strategy"] == "fedmedian"
