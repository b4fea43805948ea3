"""The ClientApp: a thin Flower shell over :mod:`client.tasks`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import tasks
from client.policy import Deadline, PolicyError, PolicyRefusal, SitePolicy
from common.config import RunConfig, SiteConfig
from common.records import from_record, to_record

log = logging.getLogger("onfh.client")


class SiteError(RuntimeError):
    """What the server learns of a failure at a site: the site, the step, the error type.

    The full traceback stays in the site's own log: exception texts can carry file paths,
    and a hospital's paths can carry patient names. A refusal by the site's policy is the
    exception: its text names only settings, bounds and the policy file, and is sent as it is.
    """


def _guarded(
    step: str, handler: Callable[..., Message], msg: Message, context: Context, overrides: dict[str, Any]
) -> Message:
    try:
        return handler(msg, context, overrides)
    except PolicyRefusal as exc:
        log.error("%s (%s)", exc, step)
        raise SiteError(str(exc)) from None
    except PolicyError as exc:
        site = _site_name(context, overrides)
        log.error("site %s: %s (%s refused)", site, exc, step)
        raise SiteError(f"site {site}: refuses every task: {exc}") from None
    except Exception as exc:  # a site's failure must not carry its details to the server
        site = _site_name(context, overrides)
        log.exception("site %s: %s failed", site, step)
        raise SiteError(
            f"site {site}: {type(exc).__name__} during {step}; details are in the site's log"
        ) from None


def _settings(context: Context, overrides: dict[str, Any]) -> tuple[RunConfig, SiteConfig]:
    cfg = RunConfig.from_dict({**dict(context.run_config), **overrides})
    return cfg, SiteConfig.from_node_config(dict(context.node_config), cfg)


def _site_name(context: Context, overrides: dict[str, Any]) -> str:
    try:
        return _settings(context, overrides)[1].site_name
    except Exception:
        return "unknown-site"


def _setup(context: Context, overrides: dict[str, Any]) -> tuple[RunConfig, SiteConfig, Deadline]:
    """The run's and the site's settings, once the site's policy (node config ``policy-file``)
    allows the run config; the task's wall-time clock starts here.

    Raises:
        PolicyRefusal: a run-config value is out of the site's policy (nothing has been done).
        PolicyError: the site's policy file cannot be used.
    """
    cfg, site = _settings(context, overrides)
    policy = SitePolicy.load(site.policy_file)
    policy.enforce(site.site_name, cfg)
    return cfg, site, policy.deadline(site.site_name)


def _reply(msg: Message, site: SiteConfig, metrics: dict, arrays: dict | None = None) -> Message:
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-name": site.site_name})}
    )
    if arrays is not None:
        content["arrays"] = to_record(arrays)
    return Message(content=content, reply_to=msg)


def handle_train(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    cfg, site, deadline = _setup(context, overrides)
    config = msg.content["config"]
    phase, phase_round = str(config["phase"]), int(config["phase-round"])
    # FedBN: the site's own normalisation layers live in its cache dir, not in ``context.state``,
    # so that they survive a restart of the site or of the simulation (a resumed run).
    before = tasks.load_local_layers(site, cfg, phase, before=phase_round) if cfg.fedbn else None
    arrays, metrics, local = tasks.train_round(
        phase, site, cfg, from_record(msg.content["arrays"]), phase_round, before, deadline.check
    )
    if cfg.fedbn and local:
        tasks.save_local_layers(site, cfg, phase, phase_round, local)
    return _reply(msg, site, metrics, arrays)


def handle_evaluate(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    cfg, site, deadline = _setup(context, overrides)
    config = msg.content["config"]
    phase, split = str(config.get("phase", "stage")), str(config.get("split", "val"))
    local = tasks.load_local_layers(site, cfg, phase) if cfg.fedbn else None
    arrays = from_record(msg.content["arrays"])
    metrics = tasks.evaluate_round(phase, split, site, cfg, arrays, local, deadline.check)
    return _reply(msg, site, metrics)


def handle_query(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """Site inventory: the site's name and how much data each phase can use (counts only)."""
    cfg, site, _ = _setup(context, overrides)
    return _reply(msg, site, tasks.inventory(site, cfg))


def make_client_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is pyproject's ``[tool.flwr.app.config]`` plus ``overrides``."""
    overrides = dict(overrides or {})
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _guarded("training", handle_train, msg, context, overrides)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _guarded("evaluation", handle_evaluate, msg, context, overrides)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return _guarded("inventory", handle_query, msg, context, overrides)

    return app


app = make_client_app()
