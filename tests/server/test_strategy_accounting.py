"""Per-round byte and time accounting of the guarded strategy, on real Flower messages.

The strategy is the one the server builds (``build_strategy``); messages are Flower's own
``Message``/``ArrayRecord`` objects. The only stand-in is the transport: a ``Grid`` that lists two
connected nodes (the strategy asks it for node ids only; replies are built here as a site would).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunConfig
from common.records import to_record
from server.accounting import message_bytes, tensor_bytes
from server.results import RunRecorder
from server.strategies import build_strategy
from server.strategy import PhaseState

SITES = {11: "site-a", 12: "site-b"}


def _not_for_configure(name: str):
    raise AssertionError(f"configure_* should only list nodes; it called Grid.{name}")


class TwoNodeGrid(Grid):
    """Flower's Grid reduced to listing the connected nodes: the only call a strategy's
    configure_* makes. Every other method fails the test if called."""

    def set_run(self, run):
        _not_for_configure("set_run")

    @property
    def run(self):
        _not_for_configure("run")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        _not_for_configure("create_message")

    def get_node_ids(self):
        return list(SITES)

    def push_messages(self, messages):
        _not_for_configure("push_messages")

    def pull_messages(self, message_ids):
        _not_for_configure("pull_messages")

    def send_and_receive(self, messages, *, timeout=None):
        _not_for_configure("send_and_receive")


@pytest.fixture(autouse=True)
def server_identity():
    """What Flower's ServerApp runtime sets before a strategy creates messages."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def reference() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=8).astype(np.float32),
        "bn.running_mean": np.zeros(8, np.float32),
    }


def reply(msg: Message, arrays: dict | None, metrics: dict) -> Message:
    """A site's reply as client/client_app.py builds it."""
    site = SITES[msg.metadata.dst_node_id]
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-name": site})})
    if arrays is not None:
        content["arrays"] = to_record(arrays)
    return Message(content=content, reply_to=msg)


def guarded(tmp_path=None):
    state = PhaseState("pretrain", sites=dict(SITES))
    recorder = RunRecorder(tmp_path, {}) if tmp_path is not None else None
    ended = []

    def on_round_end(round_no, arrays, summary):
        ended.append(round_no)
        if recorder is not None:
            recorder.round_done(
                "pretrain", round_no, {k: v for k, v in state.rounds[-1].items() if k != "round"}
            )

    strategy = build_strategy(
        RunConfig(secure_aggregation=False, min_sites=1), state, reference(), on_round_end
    )
    return strategy, state, recorder, ended


def test_tensor_and_message_bytes_of_a_record():
    arrays = {"w": np.zeros((4, 5), np.float16), "b": np.zeros(3, np.float32)}
    record = to_record(arrays)
    assert tensor_bytes(record) == 4 * 5 * 2 + 3 * 4
    msg = Message(
        RecordDict({"arrays": record, "config": ConfigRecord({"x": 1})}), dst_node_id=11, message_type="train"
    )
    tensors, records = message_bytes(msg)
    assert tensors == 52
    assert records == record.count_bytes() + ConfigRecord({"x": 1}).count_bytes()
    assert records > tensors  # array headers and keys on top of the tensors


def test_round_records_bytes_per_site_before_the_float32_cast(tmp_path):
    strategy, state, recorder, ended = guarded(tmp_path)
    ref = reference()
    fp32 = sum(v.nbytes for v in ref.values())
    grid = TwoNodeGrid()

    messages = list(strategy.configure_train(1, to_record(ref), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]
    time.sleep(0.05)  # the sites' work, as the server waits for it
    replies = [
        reply(messages[0], {k: v + 1 for k, v in ref.items()}, {"num-examples": 3, "train-seconds": 1.5}),
        # float16 on the wire (update-dtype = "float16")
        reply(
            messages[1],
            {k: (v + 2).astype(np.float16) for k, v in ref.items()},
            {"num-examples": 1, "train-seconds": 0.5},
        ),
    ]
    sites = [SITES[m.metadata.dst_node_id] for m in messages]
    arrays, _ = strategy.aggregate_train(1, replies)

    entry = state.rounds[-1]
    assert entry["bytes"]["train-sent"] == {"site-a": fp32, "site-b": fp32}
    received = dict(zip(sites, (fp32, fp32 // 2), strict=True))
    assert entry["bytes"]["train-received"] == received
    for key, per_site in entry["bytes"].items():
        for site, n in per_site.items():
            assert entry["message-bytes"][key][site] > n  # headers, keys, metrics on top
    assert entry["site-train-seconds"] == dict(zip(sites, (1.5, 0.5), strict=True))
    seconds = entry["seconds"]
    assert seconds["train-wait"] >= 0.05
    assert seconds["train"] >= seconds["train-wait"] + seconds["aggregate"]
    assert time.time() - 5 < entry["started"] <= time.time()
    # Behaviour unchanged: aggregation in float32, example-weighted.
    expected = (ref["conv.bias"] + 1) * 3 / 4 + (ref["conv.bias"] + 2) * 1 / 4  # 3 and 1 examples
    assert arrays["conv.bias"].numpy().dtype == np.float32
    np.testing.assert_allclose(arrays["conv.bias"].numpy(), expected, rtol=1e-3)

    messages = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid))
    evaluation = {"num-examples": 4, "mae-hu": 80.0, "psnr": 20.0, "ssim": 0.5}
    strategy.aggregate_evaluate(1, [reply(m, None, evaluation) for m in messages])

    entry = state.rounds[-1]
    assert entry["bytes"]["evaluate-sent"] == {"site-a": fp32, "site-b": fp32}
    assert entry["bytes"]["evaluate-received"] == {"site-a": 0, "site-b": 0}  # metrics only
    assert entry["message-bytes"]["evaluate-received"]["site-a"] > 0
    seconds = entry["seconds"]
    assert seconds["round"] >= seconds["train"] + seconds["evaluate"]
    assert ended == [1] and seconds["on-round-end"] >= 0

    # The figures reach metrics.jsonl through the server's recorder (site names and numbers only).
    recorder.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["bytes"]["train-received"] == received
    assert line["seconds"]["round"] == pytest.approx(seconds["round"])
    assert "on-round-end" not in line["seconds"]  # measured after the line is written


def test_rejected_replies_are_counted_as_traffic():
    strategy, state, _, _ = guarded()
    ref = reference()
    messages = list(strategy.configure_train(1, to_record(ref), ConfigRecord(), TwoNodeGrid()))
    bad = {k: np.full_like(v, np.nan) for k, v in ref.items()}
    replies = [
        reply(messages[0], dict(ref), {"num-examples": 2, "train-seconds": 1.0}),
        reply(messages[1], bad, {"num-examples": 2, "train-seconds": 1.0}),
    ]
    strategy.aggregate_train(1, replies)
    entry = state.rounds[-1]
    assert entry["train-sites"] == 1
    assert [f["site"] for f in state.failures] == [SITES[messages[1].metadata.dst_node_id]]
    fp32 = sum(v.nbytes for v in ref.values())
    assert entry["bytes"]["train-received"] == {"site-a": fp32, "site-b": fp32}


def test_each_round_gets_its_own_figures():
    strategy, state, _, _ = guarded()
    ref = reference()
    arrays = to_record(ref)
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), TwoNodeGrid()))
        # round 2: only one site answers
        answering = messages if server_round == 1 else messages[:1]
        replies = [reply(m, dict(ref), {"num-examples": 1, "train-seconds": 0.1}) for m in answering]
        arrays, _ = strategy.aggregate_train(server_round, replies)
    first, second = state.rounds
    assert len(first["bytes"]["train-received"]) == 2
    assert len(second["bytes"]["train-received"]) == 1
    assert second["started"] >= first["started"]
    assert [f["reason"] for f in state.failures] == ["no reply before the round timeout"]
