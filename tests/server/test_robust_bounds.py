"""Every reply's weight and name are bound to what the server knows: inventory caps, node-bound names, norm bound.

Real Flower messages through the strategy the server builds, as in ``test_robust_rules.py``.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message

from common.config import RunConfig
from common.records import to_record
from server.bounds import ReplyBounds, example_cap, norm_outliers
from server.results import RunRecorder
from server.strategies import build_strategy
from server.strategy import PhaseState
from tests.server.test_robust_rules import (  # noqa: F401  (server_identity: an autouse fixture)
    NodeGrid,
    direction,
    flat,
    reference,
    reply,
    server_identity,
    sites,
)

INVENTORY = {f"site-{i:02d}": {"hips": 30, "labelled-train": 20, "pairs": 5000} for i in range(4)}


def train_round(strategy, state, nodes, updates, claims, names=None, server_round=1):
    """One training round: node -> update scale (x d), node -> claimed examples, node -> claimed name."""
    ref, d = reference(), direction()
    grid = NodeGrid(nodes)
    messages = list(strategy.configure_train(server_round, to_record(ref), ConfigRecord(), grid))
    replies = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        arrays = {k: ref[k] + updates[node] * d[k] for k in ref}
        name = (names or {}).get(node, state.sites.get(node, f"node-{node}"))
        replies.append(reply(msg, arrays, claims[node], name))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return flat({k: v.numpy() for k, v in arrays.items()})


def test_caps_come_from_the_inventory_of_each_phase():
    cfg = RunConfig(secure_aggregation=False, pretrain_max_pairs=1000)
    assert example_cap("stage", INVENTORY["site-00"], cfg) == 20  # labelled training hips
    assert example_cap("pretrain", INVENTORY["site-00"], cfg) == 1000  # pairs, as the site caps them
    assert example_cap("pretrain", {"pairs": 12}, cfg) == 12
    bounds = ReplyBounds.for_phase("pretrain", cfg, INVENTORY)
    assert bounds.clip("site-00", True, 900) == (900, None)
    weight, reason = bounds.clip("site-00", True, 1500)
    assert weight == 1000 and "claimed num-examples=1500 MR-CT pairs" in reason
    assert ReplyBounds.for_phase("stage", cfg, None).clip("site-00", True, 10_000) == (10_000, None)


def test_a_site_claiming_ten_thousand_hips_gets_its_inventorys_weight(caplog):
    named = sites(4)
    state = PhaseState("stage", sites=dict(named))
    strategy = build_strategy(
        RunConfig(secure_aggregation=False, strategy="fedavg"), state, reference(), inventory=INVENTORY
    )
    nodes = sorted(named)
    # Three honest sites move by d with 20 hips each; site-03 moves by 3d and claims 10,000 hips.
    updates = {n: 1.0 for n in nodes} | {nodes[-1]: 3.0}
    claims = {n: 20 for n in nodes} | {nodes[-1]: 10_000}
    with caplog.at_level(logging.WARNING, logger="onfh.server"):
        aggregate = train_round(strategy, state, nodes, updates, claims)
    ref, d = flat(reference()), flat(direction())
    np.testing.assert_allclose(aggregate, ref + 1.5 * d, atol=1e-5)  # equal weights: (1 + 1 + 1 + 3) / 4
    (clipped,) = state.failures
    assert (clipped["site"], clipped["round"], clipped["action"]) == ("site-03", 1, "clipped")
    assert (
        "num-examples=10000 labelled training hips" in clipped["reason"]
        and "clipped to 20" in clipped["reason"]
    )
    assert "site site-03 clipped" in caplog.text
    assert state.rounds[-1]["train-sites"] == 4


def test_the_site_name_is_the_nodes_from_the_inventory_not_the_messages():
    named = sites(3)
    state = PhaseState("stage", sites=dict(named))
    strategy = build_strategy(RunConfig(secure_aggregation=False), state, reference(), inventory=INVENTORY)
    nodes = sorted(named) + [199]  # node 199 joined without answering the inventory
    updates, claims = {n: 1.0 for n in nodes}, {n: 20 for n in nodes} | {199: 500}
    names = {nodes[1]: "site-00", 199: "site-02"}  # site-01 claims site-00's name; 199 claims site-02's
    for server_round in (1, 2):
        train_round(strategy, state, nodes, updates, claims, names, server_round)
    flags = [(f["round"], f["site"], f["action"]) for f in state.failures]
    # The impostor is flagged every round under its own bound name; the unbound node once, as node-199.
    assert flags.count((1, "site-01", "flagged")) == 1 and flags.count((2, "site-01", "flagged")) == 1
    assert [f for f in flags if f[1] == "node-199" and f[2] == "flagged"] == [(1, "node-199", "flagged")]
    impostor = next(f for f in state.failures if f["site"] == "site-01")
    assert "registered as 'site-01'" in impostor["reason"] and "claims 'site-00'" in impostor["reason"]
    # The unbound node gets no name of its choosing and no more weight than the smallest site.
    clipped = [f for f in state.failures if f["action"] == "clipped"]
    assert {f["site"] for f in clipped} == {"node-199"} and "smallest site's 20" in clipped[0]["reason"]
    received = state.rounds[-1]["bytes"]["train-received"]
    assert set(received) == {"site-00", "site-01", "site-02", "node-199"}
    assert named == {n: state.sites[n] for n in named}  # nothing renamed


def test_an_error_from_a_node_without_inventory_keeps_the_neutral_label():
    state = PhaseState("stage", sites={})
    strategy = build_strategy(RunConfig(secure_aggregation=False), state, reference(), inventory={})
    messages = list(strategy.configure_train(1, to_record(reference()), ConfigRecord(), NodeGrid([7])))
    failed = Message(Error(code=0, reason="site site-99: RuntimeError during train"), reply_to=messages[0])
    with pytest.raises(RuntimeError, match="fewer than min-sites=1"):
        strategy.aggregate_train(1, [failed])
    assert state.failures[0]["site"] == "node-7" and "site-99: RuntimeError" in state.failures[0]["reason"]


def test_an_update_a_hundred_times_the_median_is_excluded_and_reported(tmp_path, caplog):
    named = sites(4)
    state = PhaseState("stage", sites=dict(named))
    strategy = build_strategy(RunConfig(secure_aggregation=False), state, reference(), inventory=INVENTORY)
    recorder = RunRecorder(tmp_path, {})
    nodes = sorted(named)
    updates = {n: 1.0 for n in nodes} | {nodes[0]: 100.0}
    with caplog.at_level(logging.WARNING, logger="onfh.server"):
        aggregate = train_round(strategy, state, nodes, updates, {n: 20 for n in nodes})
    np.testing.assert_allclose(aggregate, flat(reference()) + flat(direction()), atol=1e-5)
    (excluded,) = state.failures
    assert (excluded["site"], excluded["round"], excluded["action"]) == ("site-00", 1, "excluded")
    assert "100.0 x the round's median" in excluded["reason"] and "update-norm-factor=5" in excluded["reason"]
    assert "site site-00 excluded" in caplog.text
    entry = state.rounds[-1]
    assert entry["train-sites"] == 3
    norm = float(np.linalg.norm(flat(direction())))
    assert entry["update-norms"]["site-01"] == pytest.approx(norm, rel=1e-4)
    assert entry["update-norm-median"] == pytest.approx(norm, rel=1e-4)
    recorder.round_done("stage", 1, {k: v for k, v in entry.items() if k != "round"})
    recorder.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["update-norms"]["site-00"] == pytest.approx(100 * norm, rel=1e-4)


def test_the_norm_bound_needs_three_replies_and_can_be_turned_off():
    assert norm_outliers({"a": 1.0, "b": 100.0}, 5.0)[1] == {}
    assert norm_outliers({"a": 1.0, "b": 1.0, "c": 100.0}, 0.0)[1] == {}
    assert norm_outliers({"a": 0.0, "b": 0.0, "c": 1.0}, 5.0)[1] == {}  # median 0: no bound
    assert norm_outliers({"a": 1.0, "b": 1.2, "c": 6.0}, 5.0)[1] == {}  # 5 x 1.2: at the bound
    assert norm_outliers({"a": 1.0, "b": 1.2, "c": 6.5}, 5.0) == (1.2, {"c": 6.5})


def test_an_offline_sites_error_written_by_the_superlink_is_its_one_failure():
    # Flower answers for a node that went offline with an error reply from the SuperLink itself
    # (node 1); it must count as that site's failure, with the real reason, and only once.
    named = sites(2)
    state = PhaseState("stage", sites=dict(named))
    strategy = build_strategy(RunConfig(secure_aggregation=False), state, reference(), inventory=INVENTORY)
    nodes = sorted(named)
    messages = list(strategy.configure_train(1, to_record(reference()), ConfigRecord(), NodeGrid(nodes)))
    for i, msg in enumerate(messages):
        msg.metadata.__dict__["_message_id"] = f"sent-{i}"  # what Flower's grid does when it pushes
    ref, d = reference(), direction()
    first, second = (state.sites[m.metadata.dst_node_id] for m in messages)  # Flower samples in any order
    healthy = reply(messages[0], {k: ref[k] + d[k] for k in ref}, 20, first)
    offline = Message(Error(code=0, reason="Node Unavailable: the node went offline"), reply_to=messages[1])
    offline.metadata.__dict__["_src_node_id"] = 1  # SUPERLINK_NODE_ID
    strategy.aggregate_train(1, [healthy, offline])
    (failure,) = state.failures
    assert failure["site"] == second
    assert "Node Unavailable" in failure["reason"] and "round timeout" not in failure["reason"]


def test_a_site_joining_after_the_inventory_is_named_by_its_registration():
    # In deployment a site's key is registered under its name; a node that joins mid-run takes
    # that name, and a reply claiming another is flagged, not believed.
    class RegisteredGrid(NodeGrid):
        def get_nodes(self):
            return [SimpleNamespace(node_id=n, name="site-late" if n == 9 else "") for n in self.nodes]

    named = sites(3)
    state = PhaseState("stage", sites=dict(named))
    strategy = build_strategy(RunConfig(secure_aggregation=False), state, reference(), inventory=INVENTORY)
    nodes = sorted(named) + [9]
    messages = list(
        strategy.configure_train(1, to_record(reference()), ConfigRecord(), RegisteredGrid(nodes))
    )
    assert state.sites[9] == "site-late"
    ref, d = reference(), direction()
    claims = {n: state.sites[n] for n in nodes} | {9: "site-00"}  # node 9 claims another site's name
    replies = [
        reply(m, {k: ref[k] + d[k] for k in ref}, 20, claims[m.metadata.dst_node_id]) for m in messages
    ]
    strategy.aggregate_train(1, replies)
    flagged = [f for f in state.failures if f["action"] == "flagged"]
    assert [f["site"] for f in flagged] == ["site-late"] and "claims 'site-00'" in flagged[0]["reason"]


@pytest.mark.parametrize("rule", ["fedtrimmedavg", "krum", "multikrum"])
def test_a_site_excluded_by_the_norm_bound_does_not_end_a_robust_round(rule, caplog):
    # 4 sites, f = 1, trimmed-beta 0.25: an x100 update is excluded, 3 remain, too few for the rule;
    # the round falls back to the median of the honest three instead of failing the run.
    named = sites(4)
    state = PhaseState("stage", sites=dict(named))
    cfg = RunConfig(secure_aggregation=False, strategy=rule, trimmed_beta=0.25, num_malicious_sites=1)
    strategy = build_strategy(cfg, state, reference(), inventory=INVENTORY)
    nodes = sorted(named)
    updates = {n: 1.0 for n in nodes} | {nodes[0]: 100.0}
    with caplog.at_level(logging.WARNING, logger="onfh.server"):
        aggregate = train_round(strategy, state, nodes, updates, {n: 20 for n in nodes})
    np.testing.assert_allclose(aggregate, flat(reference()) + flat(direction()), atol=1e-5)
    assert [f["action"] for f in state.failures] == ["excluded"]
    assert "median aggregation this round" in caplog.text
