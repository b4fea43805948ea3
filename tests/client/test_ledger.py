"""The egress ledger (one line per message a site sends) and ``onfh site audit`` over it."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client import audit, daemon, ledger
from client.client_app import SiteError, _reply, make_client_app
from common.config import RunConfig, SiteConfig


def request(kind: str = MessageType.TRAIN, config: dict | None = None, run_id: int = 7) -> Message:
    """A server's message as a ClientApp receives it."""
    content = RecordDict({"config": ConfigRecord(config if config is not None else {"phase": "stage"})})
    metadata = Metadata(
        run_id=run_id,
        message_id="m1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="3",
        created_at=time.time(),
        ttl=60.0,
        message_type=kind,
    )
    return Message(content, metadata=metadata)


def site_context(tmp_path: Path, **node: str) -> Context:
    node_config = {"data-dir": str(tmp_path / "north-data"), "site-name": "north", **node}
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def north(tmp_path: Path) -> SiteConfig:
    return SiteConfig.from_node_config(dict(site_context(tmp_path).node_config), RunConfig())


def test_append_only_owner_readable_one_line_each(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "ledger.jsonl"
    ledger.append(path, {"kind": "query", "n": np.int64(3)})
    first = path.read_bytes()
    path.chmod(0o644)  # loosened by someone: the next append tightens it again
    ledger.append(path, {"kind": "train", "values": np.arange(2.0)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(first)  # what was written is never rewritten
    assert ledger.read(path) == [{"kind": "query", "n": 3}, {"kind": "train", "values": [0.0, 1.0]}]
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"line 3 is not JSON"):
        ledger.read(path)


def test_the_ledger_sits_beside_the_cache_unless_the_node_config_names_one(tmp_path: Path) -> None:
    assert (
        ledger.default_ledger_path(tmp_path / "cache", "st mary's")
        == tmp_path / "st_mary_s.egress-ledger.jsonl"
    )
    assert ledger.ledger_path({}, tmp_path / "c", "north") == tmp_path / "north.egress-ledger.jsonl"
    assert ledger.ledger_path({"ledger-file": "/x/l.jsonl"}, tmp_path / "c", "north") == Path("/x/l.jsonl")


def test_a_reply_is_recorded_value_by_value_before_it_is_returned(tmp_path: Path) -> None:
    """``_reply`` is where every reply is built: its line holds each metric, config value and array."""
    msg = request(config={"phase": "stage", "phase-round": 4})
    arrays = {"encoder.w": np.zeros((3, 2), np.float16), "head.b": np.zeros(5, np.float32)}
    metrics = {"num-examples": 12, "loss": 0.5, "score-histogram": [1.0, 2.0]}
    reply = _reply(msg, site_context(tmp_path), north(tmp_path), metrics, arrays)
    (line,) = ledger.read(ledger.default_ledger_path(north(tmp_path).cache_dir, "north"))
    assert reply.content["metrics"]["loss"] == 0.5
    assert (line["site"], line["run-id"], line["phase"], line["round"], line["kind"]) == (
        "north",
        7,
        "stage",
        4,
        "train",
    )
    assert line["arrays"] == [
        {"name": "encoder.w", "shape": [3, 2], "dtype": "float16", "bytes": 12},
        {"name": "head.b", "shape": [5], "dtype": "float32", "bytes": 20},
    ]
    assert line["array-bytes"] == 32 and line["metrics"] == metrics
    assert line["config"] == {"site-name": "north"} and line["masked"] is False and line["error"] is None
    assert line["time"].endswith("+00:00")


def test_query_and_evaluate_lines_name_their_phase_round_and_split(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    query = request(MessageType.QUERY, {"query": "inventory"})
    ledger.append(path, ledger.reply_entry(query, Message(RecordDict(), reply_to=query), "north"))
    evaluate = request(MessageType.EVALUATE, {"phase": "stage", "split": "test"})
    ledger.append(path, ledger.reply_entry(evaluate, Message(RecordDict(), reply_to=evaluate), "north"))
    first, second = ledger.read(path)
    assert (first["kind"], first["phase"], first["round"]) == ("query", "inventory", 3)
    assert (second["kind"], second["phase"], second["split"]) == ("evaluate", "stage", "test")


def test_an_error_reply_is_a_message_too(tmp_path: Path) -> None:
    """A refusal goes to the server as the SiteError's text: the same text is in the ledger."""
    policy = tmp_path / "policy.toml"
    policy.write_text("[limits]\nmax-stage-epochs = 5\n")
    own = tmp_path / "own-ledger.jsonl"
    context = site_context(tmp_path, **{"policy-file": str(policy), "ledger-file": str(own)})
    with pytest.raises(SiteError) as caught:
        make_client_app({"stage-epochs": 50})(request(config={"phase": "stage", "phase-round": 1}), context)
    (line,) = ledger.read(own)
    assert (line["kind"], line["task"], line["phase"], line["round"]) == ("error", "train", "stage", 1)
    assert line["error"] == str(caught.value) and line["arrays"] == [] and line["metrics"] == {}


def test_a_crash_is_recorded_as_the_digest_the_server_gets(tmp_path: Path) -> None:
    """No data folder: the evaluation fails; the ledger holds the one line sent, not the exception."""
    context = site_context(tmp_path)
    evaluate = request(MessageType.EVALUATE, {"phase": "stage", "split": "val"})
    with pytest.raises(SiteError) as caught:
        make_client_app()(evaluate, context)
    (line,) = ledger.read(ledger.default_ledger_path(north(tmp_path).cache_dir, "north"))
    assert line["error"] == str(caught.value)
    assert line["error"].endswith("during evaluation; details are in the site's log")
    assert str(tmp_path) not in line["error"]


def entries() -> list[dict]:
    base = {"site": "north", "arrays": [], "config": {"site-name": "north"}, "masked": False}
    return [
        {**base, "time": "2026-01-02T10:00:00+00:00", "run-id": 1, "phase": "inventory", "kind": "query",
         "array-bytes": 0, "metrics": {"num-examples": 12, "hips": 12}},
        {**base, "time": "2026-01-02T10:01:00+00:00", "run-id": 1, "phase": "stage", "kind": "train",
         "array-bytes": 4096, "metrics": {"num-examples": 8, "loss": 1.0}},
        {**base, "time": "2026-01-02T10:02:00+00:00", "run-id": 1, "phase": "stage", "kind": "train",
         "array-bytes": 4096, "metrics": {"num-examples": 8, "loss": 0.9}},
        {**base, "time": "2026-01-02T10:03:00+00:00", "run-id": 1, "phase": "stage", "kind": "evaluate",
         "array-bytes": 0, "metrics": {"num-examples": 0, "withheld": 1, "min-release-hips": 10}},
        {**base, "time": "2026-01-03T08:00:00+00:00", "run-id": 2, "phase": "stage", "kind": "error",
         "array-bytes": 0, "metrics": {}, "config": {}, "error": "site north: refuses ..."},
    ]  # fmt: skip


def test_audit_summary_counts_runs_phases_kinds_bytes_and_keys() -> None:
    summary = audit.summarise(entries(), server="fl.example.org:9092")
    assert summary["messages"] == 5 and summary["array-bytes"] == 8192
    assert (summary["first"], summary["last"]) == ("2026-01-02T10:00:00+00:00", "2026-01-03T08:00:00+00:00")
    rows = {(r["run-id"], r["phase"], r["kind"]): (r["messages"], r["array-bytes"]) for r in summary["rows"]}
    assert rows == {
        (1, "inventory", "query"): (1, 0),
        (1, "stage", "train"): (2, 8192),
        (1, "stage", "evaluate"): (1, 0),
        (2, "stage", "error"): (1, 0),
    }
    assert summary["metric-keys"] == ["hips", "loss", "min-release-hips", "num-examples", "withheld"]
    assert summary["config-keys"] == ["site-name"] and summary["sites"] == ["north"]
    assert (summary["withheld"], summary["errors"], summary["masked"]) == (1, 1, 0)
    text = audit.render(summary, "L")
    assert "server: fl.example.org:9092" in text and "8.0 KiB" in text
    assert "metric keys sent: hips, loss, min-release-hips, num-examples, withheld" in text
    assert audit.summarise([])["messages"] == 0 and "messages: 0" in audit.render(audit.summarise([]), "L")


def write_ledger(path: Path) -> Path:
    for entry in entries():
        ledger.append(path, entry)
    return path


def test_onfh_site_audit_reads_a_ledger_file_as_table_or_json(tmp_path: Path, capsys) -> None:
    path = write_ledger(tmp_path / "l.jsonl")
    assert daemon.main(["audit", "--ledger", str(path)]) == 0
    out = capsys.readouterr().out
    assert "server: unknown (pass --kit)" in out and "messages: 5" in out
    assert audit.main(["--ledger", str(path), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["ledger"] == str(path) and parsed["messages"] == 5 and parsed["errors"] == 1


def test_onfh_site_audit_finds_the_ledger_of_a_kit(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "site.json").write_text(
        json.dumps({"site-name": "north", "server-address": "fl.example.org:9092"})
    )
    assert audit.main(["--kit", str(kit)]) == audit.EXIT_BAD_ARGS
    assert "no egress ledger at" in capsys.readouterr().err
    # Where onfh site keeps it by default, and beside a --cache given to onfh site.
    home_cache = tmp_path / "xdg" / "onfh" / "north" / "cache"
    write_ledger(ledger.default_ledger_path(home_cache, "north"))
    assert audit.main(["--kit", str(kit)]) == 0
    assert "server: fl.example.org:9092" in capsys.readouterr().out
    write_ledger(ledger.default_ledger_path(tmp_path / "elsewhere" / "cache", "north"))
    assert audit.main(["--kit", str(kit), "--cache", str(tmp_path / "elsewhere" / "cache"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["server"] == "fl.example.org:9092"


def test_onfh_site_audit_says_what_to_pass(tmp_path: Path, capsys) -> None:
    assert audit.main([]) == audit.EXIT_BAD_ARGS
    assert "pass --kit DIR" in capsys.readouterr().err
    assert audit.main(["--kit", str(tmp_path)]) == audit.EXIT_BAD_ARGS
    assert "site.json cannot be read" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
