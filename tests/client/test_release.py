"""What an evaluation reply releases: the site's bounds (min-release-hips, max-release-bins), and the
server's pooling of what the sites released (withheld replies, histograms of different bins)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from sklearn.metrics import roc_auc_score

from client import tasks
from client.policy import ReleaseBounds
from common.config import SiteConfig
from common.models.factory import build_staging
from common.training.evaluation import pool_histograms, rebin_histograms, site_evaluation
from common.training.metrics import auroc_from_histograms, score_histograms
from common.training.weights import get_shared_state
from server.accounting import RoundAccount, is_withheld, summarise_evaluation
from tests.client.test_ledger import request
from tests.server.test_federation import tiny_config


def reply(site: str, metrics: dict) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-name": site})})
    return Message(content, reply_to=request(MessageType.EVALUATE, {"phase": "stage", "split": "test"}))


def site_of(msg: Message) -> str:
    return str(msg.content["site"]["site-name"])


def scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4)) + 2.0 * np.eye(4)[labels]
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True), labels


def test_rebinning_keeps_counts_and_coarse_sums_are_exact() -> None:
    probs, labels = scores(300, 0)
    fine = score_histograms(probs, labels, bins=20)
    assert np.array_equal(rebin_histograms(fine, 20), fine)
    assert np.array_equal(rebin_histograms(fine, 10), score_histograms(probs, labels, bins=10))
    coarse = score_histograms(probs, labels, bins=7)
    spread = rebin_histograms(coarse, 20)
    assert spread.shape == (4, 2, 20) and spread.sum() == pytest.approx(coarse.sum())


def test_sites_of_different_bins_pool_on_the_finest_grid() -> None:
    (p1, y1), (p2, y2) = scores(200, 1), scores(150, 2)
    same = pool_histograms([score_histograms(p1, y1, 20).ravel(), score_histograms(p2, y2, 20).ravel()])
    assert np.array_equal(same, score_histograms(np.vstack([p1, p2]), np.concatenate([y1, y2]), 20))
    mixed = pool_histograms([score_histograms(p1, y1, 20).ravel(), score_histograms(p2, y2, 10).ravel()])
    assert mixed.shape == (4, 2, 20) and mixed.sum() == pytest.approx(4 * 350)
    exact = roc_auc_score(np.concatenate([y1, y2]) == 0, np.vstack([p1, p2])[:, 0])
    assert auroc_from_histograms(mixed)["per_class_auroc"][0] == pytest.approx(exact, abs=0.03)


def test_server_pools_released_replies_and_lists_withheld_sites() -> None:
    (p1, y1), (p2, y2) = scores(40, 3), scores(30, 4)
    replies = [
        reply("a", site_evaluation(p1, y1, bins=20)),
        reply("b", site_evaluation(p2, y2, bins=10)),
        reply("c", tasks.withheld_evaluation(ReleaseBounds(10, 20))),
    ]
    assert [is_withheld(m) for m in replies] == [False, False, True]
    summary = summarise_evaluation("stage", replies, site_of)
    assert summary["withheld"] == ["c"] and set(summary["sites"]) == {"a", "b"}
    assert summary["n-hips"] == 70 and summary["num-examples"] == 70
    assert len(summary["score-histogram"]) == 4 * 2 * 20
    assert 0.0 <= summary["macro-auroc"] <= 1.0
    # Every site withheld (or screened out as withheld before): nothing pooled, and said so.
    nothing = summarise_evaluation("stage", replies[2:], site_of, withheld=["d"])
    assert nothing["withheld"] == ["c", "d"] and nothing["n-hips"] == 0 and nothing["sites"] == {}
    assert np.isnan(nothing["macro-auroc"])
    pretrain = summarise_evaluation(
        "pretrain", [reply("c", tasks.withheld_evaluation(ReleaseBounds()))], site_of
    )
    assert pretrain["withheld"] == ["c"] and "mae-hu" not in pretrain


def test_the_round_account_notes_withheld_replies() -> None:
    account = RoundAccount()
    entry = account.entry(1, {}, 2)
    account.tally("evaluate-received", "a", reply("a", {"num-examples": 12, "accuracy": 0.5}))
    account.tally("evaluate-received", "c", reply("c", tasks.withheld_evaluation(ReleaseBounds())))
    assert entry["withheld"] == {"evaluate-received": ["c"]}


@pytest.fixture(scope="module")
def site_val(tiny_federation, tmp_path_factory):
    cfg = tiny_config(tiny_federation, tmp_path_factory.mktemp("release"), device="cpu")  # histogram-bins 200
    site = SiteConfig.from_node_config({"partition-id": 0}, cfg)
    arrays = get_shared_state(build_staging(cfg.model), False, "float32")
    n_val = len(tasks.site_data(site, cfg).staging_set("val")[2])
    return cfg, site, arrays, n_val


def test_a_site_withholds_an_evaluation_below_its_minimum(site_val) -> None:
    cfg, site, arrays, n_val = site_val
    assert n_val >= 1
    release = ReleaseBounds(min_hips=n_val + 1, max_bins=20)
    withheld = tasks.evaluate_round("stage", "val", site, cfg, arrays, None, release=release)
    assert withheld == {"num-examples": 0, "withheld": 1, "min-release-hips": n_val + 1}
    pretrain = tasks.evaluate_round(
        "pretrain", "val", site, cfg, arrays, None, release=ReleaseBounds(10_000, 20)
    )
    assert pretrain == {"num-examples": 0, "withheld": 1, "min-release-hips": 10_000}


def test_a_site_releases_no_finer_histogram_than_its_policy(site_val) -> None:
    cfg, site, arrays, n_val = site_val
    assert cfg.histogram_bins == 200
    released = tasks.evaluate_round("stage", "val", site, cfg, arrays, None, release=ReleaseBounds(n_val, 5))
    assert released["num-examples"] == n_val and "withheld" not in released
    assert len(released["score-histogram"]) == 4 * 2 * 5 and sum(released["score-histogram"]) == 4 * n_val
    assert sum(released["confusion"]) == n_val
