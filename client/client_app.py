"""The ClientApp: a thin Flower shell over :mod:`client.tasks`."""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import tasks
from common.run_config import RunConfig, SiteConfig
from server.records import from_record, to_record

LOCAL_KEY = "fedbn-local-{phase}"


def _setup(context: Context, overrides: dict[str, Any]) -> tuple[RunConfig, SiteConfig]:
    cfg = RunConfig.from_dict({**dict(context.run_config), **overrides})
    return cfg, SiteConfig.from_node_config(dict(context.node_config), cfg)


def _local(context: Context, phase: str) -> dict | None:
    record = context.state.array_records.get(LOCAL_KEY.format(phase=phase))
    return from_record(record) if record is not None else None


def _reply(msg: Message, site: SiteConfig, metrics: dict, arrays: dict | None = None) -> Message:
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-name": site.site_name})}
    )
    if arrays is not None:
        content["arrays"] = to_record(arrays)
    return Message(content=content, reply_to=msg)


def handle_train(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    cfg, site = _setup(context, overrides)
    config = msg.content["config"]
    phase, phase_round = str(config["phase"]), int(config["phase-round"])
    arrays, metrics, local = tasks.train_round(
        phase, site, cfg, from_record(msg.content["arrays"]), phase_round, _local(context, phase)
    )
    if local:
        context.state[LOCAL_KEY.format(phase=phase)] = to_record(local)
    return _reply(msg, site, metrics, arrays)


def handle_evaluate(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    cfg, site = _setup(context, overrides)
    config = msg.content["config"]
    phase, split = str(config.get("phase", "stage")), str(config.get("split", "val"))
    metrics = tasks.evaluate_round(
        phase, split, site, cfg, from_record(msg.content["arrays"]), _local(context, phase)
    )
    return _reply(msg, site, metrics)


def make_client_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is pyproject's ``[tool.flwr.app.config]`` plus ``overrides``."""
    overrides = dict(overrides or {})
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, overrides)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, overrides)

    return app


app = make_client_app()
