"""A run survives a site that crashes and a site that sends NaN weights, and says which and why."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from client.client_app import handle_evaluate, handle_query, handle_train
from common.config import RunConfig, SiteConfig
from server.server_app import make_server_app
from tests.server.test_federation import assert_auroc_defined_where_it_can_be, tiny_config

BROKEN_SITE = "site-01"


def faulty_client_app(overrides: dict) -> ClientApp:
    """The real ClientApp, except that site-01 crashes in pretraining and sends NaN in staging."""
    app = ClientApp()

    def site_name(context: Context) -> str:
        return SiteConfig.from_node_config(
            dict(context.node_config), RunConfig.from_dict(overrides)
        ).site_name

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        phase = str(msg.content["config"]["phase"])
        if site_name(context) == BROKEN_SITE and phase == "pretrain":
            raise RuntimeError("site site-01: simulated crash while reading the archive")
        reply = handle_train(msg, context, overrides)
        if site_name(context) == BROKEN_SITE and phase == "stage":
            arrays = reply.content["arrays"]
            key = next(iter(arrays.keys()))
            poisoned = arrays[key].numpy().copy()
            poisoned.flat[0] = np.nan
            arrays[key] = Array(poisoned)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, overrides)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, overrides)

    return app


@pytest.mark.slow
def test_run_finishes_without_the_failing_site(tiny_federation, tmp_path):
    # In the clear: with two sites, secure aggregation's threshold is both (tests/server/test_secure_aggregation.py
    # covers a site dropping out of a masked sum).
    cfg = tiny_config(tiny_federation, tmp_path, run_name="faults", secure_aggregation=False)
    overrides = cfg.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            make_server_app(overrides),
            faulty_client_app(overrides),
            num_supernodes=2,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    results = json.loads((cfg.run_dir / "results.json").read_text())
    failures = {(f["phase"], f["step"]): f for f in results["failures"]}
    crash = failures[("pretrain", "train")]
    assert crash["site"] == BROKEN_SITE and "simulated crash" in crash["reason"]
    nan = failures[("stage", "train")]
    assert nan["site"] == BROKEN_SITE and "NaN/Inf" in nan["reason"]
    # The other site carried both phases; the broken site still scored the final model.
    assert results["history"]["pretrain"][0]["train-sites"] == 1
    assert results["history"]["stage"][0]["train-sites"] == 1
    assert_auroc_defined_where_it_can_be(results["test"])
    final = np.load(cfg.run_dir / "final_model.npz")
    assert all(np.isfinite(final[k]).all() for k in final.files)
