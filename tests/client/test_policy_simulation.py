"""A site whose policy refuses the run sits it out: the run finishes with the others and says why.

Also: a training task gives its wall-time check a turn once its data are loaded and after each epoch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from client import ledger, tasks
from client.client_app import make_client_app
from common.config import SiteConfig
from common.models.factory import build_staging
from common.training.weights import get_shared_state
from server.server_app import make_server_app
from tests.server.test_federation import tiny_config

REFUSING_SITE = "site-01"


def client_app_with_policies(overrides: dict, policies: dict[int, Path]) -> ClientApp:
    """The real ClientApp; the node of partition ``p`` gets node config ``policy-file = policies[p]``
    (``run_simulation`` gives every node the same node config, so the policy is added here)."""
    real = make_client_app(overrides)
    app = ClientApp()

    def with_policy(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition in policies:
            context.node_config["policy-file"] = str(policies[partition])
        return real(msg, context)

    app.train()(with_policy)
    app.evaluate()(with_policy)
    app.query()(with_policy)
    return app


@pytest.mark.slow
def test_run_finishes_without_the_refusing_site(tiny_federation, tmp_path):
    # In the clear: with two sites, secure aggregation's threshold is both.
    cfg = tiny_config(
        tiny_federation, tmp_path, run_name="policy", secure_aggregation=False
    )  # batch 4, hip 32
    policy = tmp_path / "site-01-policy.toml"
    policy.write_text("[limits]\nmin-batch-size = 8\nmax-hip-size = 16\n")
    overrides = cfg.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            make_server_app(overrides),
            client_app_with_policies(overrides, {1: policy}),
            num_supernodes=2,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    results = json.loads((cfg.run_dir / "results.json").read_text())
    refusal = (
        f"site {REFUSING_SITE}: refuses run-config batch-size = 4: its policy ({policy.name}) allows at least 8; "
        "also hip-size = 32 (at most 16)"
    )
    failures = results["failures"]
    # The refusing site answered no step, from the inventory on; every failure is its refusal.
    steps = {(f["phase"], f["step"]) for f in failures}
    assert {("inventory", "inventory"), ("pretrain", "train"), ("stage", "train")} <= steps
    assert all(refusal in f["reason"] for f in failures), failures
    assert {f["site"] for f in failures if f["step"] == "train"} == {
        f["site"] for f in failures if f["step"] == "inventory"
    }
    assert list(results["history"]["inventory"]) == ["site-00"]
    # The other site carried both phases to the end.
    assert results["history"]["pretrain"][0]["train-sites"] == 1
    assert results["history"]["stage"][0]["train-sites"] == 1
    final = np.load(cfg.run_dir / "final_model.npz")
    assert final.files and all(np.isfinite(final[k]).all() for k in final.files)
    # Each refusal is a message the site sent: its egress ledger lists them, with the text sent.
    lines = ledger.read(ledger.default_ledger_path(Path(cfg.cache_dir) / REFUSING_SITE, REFUSING_SITE))
    assert [line["error"] for line in lines] == [refusal] * len(failures)
    # It refused before loading anything: its data were never even preprocessed.
    assert (Path(cfg.cache_dir) / "site-00").is_dir()
    assert not (Path(cfg.cache_dir) / REFUSING_SITE).exists()


def test_training_checks_its_clock_after_loading_and_each_epoch(tiny_federation, tmp_path):
    cfg = tiny_config(tiny_federation, tmp_path, stage_epochs=2, augment=False, device="cpu")
    site = SiteConfig.from_node_config({"partition-id": 0}, cfg)
    checked: list[str] = []
    arrays = get_shared_state(build_staging(cfg.model), False, "float32")
    tasks.train_round("stage", site, cfg, arrays, 1, None, checked.append)
    assert checked[0] == "loading the site data"
    assert [c.split(":")[0] for c in checked[1:]] == ["staging epoch 1/2", "staging epoch 2/2"]
