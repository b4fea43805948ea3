"""A server optimiser (FedAvgM here) steps the weights from the mean update, and takes the plain mean
for the normalisation statistics: momentum carried a running variance below zero, and every
forward pass after it gave NaN (seen on the tuning federation before this rule)."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord

from common.config import RunConfig
from common.records import from_record, to_record
from server.strategies import build_strategy
from server.strategy import PhaseState
from tests.server.test_robust_rules import NodeGrid, direction, reference, reply, sites
from tests.server.test_strategy_accounting import server_identity  # noqa: F401  (autouse: Flower's run identity)


def test_fedavgm_steps_the_weights_with_momentum_and_averages_the_running_variance():
    cfg = RunConfig(strategy="fedavgm", secure_aggregation=False, update_norm_factor=0.0)
    named, d = sites(4), direction()
    start = dict(reference(), **{"bn.running_var": np.ones(8, np.float32)})
    strategy = build_strategy(cfg, PhaseState("stage", sites=dict(named)), start)
    arrays = start
    for round_no in (1, 2):
        messages = list(
            strategy.configure_train(round_no, to_record(arrays), ConfigRecord(), NodeGrid(named))
        )
        # Every site moves the weights by 0.01 d and reports a running variance of 0.3.
        sent = dict(
            {k: arrays[k] + 0.01 * d[k] for k in d}, **{"bn.running_var": np.full(8, 0.3, np.float32)}
        )
        replies = [reply(m, sent, 10, named[m.metadata.dst_node_id]) for m in messages]
        arrays = from_record(strategy.aggregate_train(round_no, replies)[0])
    # Round 2's step is its own mean update plus 0.9 of round 1's: 1.9 x 0.01 d in all, 2.9 x 0.01 d since the start.
    np.testing.assert_allclose(
        arrays["conv.weight"], start["conv.weight"] + 0.029 * d["conv.weight"], atol=1e-5
    )
    # Stepped with momentum, the variance would be 0.3 - 0.9 x 0.7 < 0; it is the sites' mean.
    np.testing.assert_array_equal(arrays["bn.running_var"], np.full(8, 0.3, np.float32))
