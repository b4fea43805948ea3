"""The ClientApp: a thin Flower shell over :mod:`client.tasks`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

# Flower starts a fresh ClientApp process for every message, and most messages of a round are
# steps of secure aggregation that need neither torch nor MONAI (several seconds to import on 2
# cores): the handlers that train, evaluate or deliver import client.tasks / client.delivery themselves.
from client import ledger, secagg
from client.policy import Deadline, PolicyError, PolicyRefusal, ReleaseBounds, SitePolicy
from common.config import RunConfig, SiteConfig
from common.records import from_record, to_record
from common.secagg import SecAggError, encode_counts, evaluation_scale, evaluation_vector, training_vector
from common.updates import clip_update, update_of

log = logging.getLogger("onfh.client")


class SiteError(RuntimeError):
    """What the server learns of a failure at a site: the site, the step, the error type.

    The full traceback stays in the site's own log: exception texts can carry file paths,
    and a hospital's paths can carry patient names. A refusal by the site's policy is the
    exception: its text names only settings, bounds and the policy file's name, and is sent as
    it is. Every such text is a message the site sends: it is written to the egress ledger.
    """


def _guarded(
    step: str, handler: Callable[..., Message], msg: Message, context: Context, overrides: dict[str, Any]
) -> Message:
    """Run ``handler``; on any failure, record the error reply in the site's egress ledger and raise
    :class:`SiteError` with the only text the server gets (Flower sends it as the error reply)."""
    try:
        return handler(msg, context, overrides)
    except PolicyRefusal as exc:
        log.error("%s (%s)", exc, step)
        reason = str(exc)
    except SecAggError as exc:  # its text names only the protocol rule the request broke
        site = _site(context, overrides)
        name = site.site_name if site else "unknown-site"
        log.error("site %s: %s (%s refused)", name, exc, step)
        reason = f"site {name}: refuses {step}: {exc}"
    except PolicyError as exc:
        site = _site(context, overrides)
        name = site.site_name if site else "unknown-site"
        log.error("site %s: %s (%s refused)", name, exc, step)
        reason = f"site {name}: refuses every task: {exc}"
        if site is not None and site.policy_file is not None:  # the file's folder stays at the site
            reason = reason.replace(str(site.policy_file), site.policy_file.name)
    except Exception as exc:  # a site's failure must not carry its details to the server
        site = _site(context, overrides)
        name = site.site_name if site else "unknown-site"
        log.exception("site %s: %s failed", name, step)
        reason = f"site {name}: {type(exc).__name__} during {step}; details are in the site's log"
    _record_error(msg, context, overrides, reason)
    raise SiteError(reason)


def _record_error(msg: Message, context: Context, overrides: dict[str, Any], reason: str) -> None:
    """The error reply's ledger line; a ledger that cannot be written is logged (the text is sent anyway)."""
    try:
        site = _site(context, overrides)
        if site is None:
            raise ValueError("the site's node config cannot be read, so neither can its ledger-file")
        path = ledger.ledger_path(context.node_config, site.cache_dir, site.site_name)
        ledger.append(path, ledger.error_entry(msg, reason, site.site_name))
    except Exception:
        log.exception("the error reply (%s) could not be written to the egress ledger", reason)


def _settings(context: Context, overrides: dict[str, Any]) -> tuple[RunConfig, SiteConfig]:
    cfg = RunConfig.from_dict({**dict(context.run_config), **overrides})
    return cfg, SiteConfig.from_node_config(dict(context.node_config), cfg)


def _site(context: Context, overrides: dict[str, Any]) -> SiteConfig | None:
    try:
        return _settings(context, overrides)[1]
    except Exception:
        return None


def _setup(context: Context, overrides: dict[str, Any]) -> tuple[RunConfig, SiteConfig, SitePolicy, Deadline]:
    """The run's and the site's settings and the site's policy (node config ``policy-file``),
    once the policy allows the run config; the task's wall-time clock starts here.

    Raises:
        PolicyRefusal: a run-config value is out of the site's policy (nothing has been done).
        PolicyError: the site's policy file cannot be used.
    """
    cfg, site = _settings(context, overrides)
    policy = SitePolicy.load(site.policy_file)
    policy.enforce(site.site_name, cfg)
    return cfg, site, policy, policy.deadline(site.site_name)


def _reply(
    msg: Message,
    context: Context,
    site: SiteConfig,
    metrics: dict,
    arrays: dict | None = None,
    secure: dict | None = None,
    masked: bool = False,
) -> Message:
    """The reply to ``msg``, once its ledger line is written (every value, the arrays' names,
    shapes, dtypes and bytes): a reply the site cannot record is not sent. ``secure``: the
    secure-aggregation record of a keys, shares or unmask step; ``masked``: ``arrays`` is a masked vector."""
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-name": site.site_name})}
    )
    if arrays is not None:
        content["arrays"] = to_record(arrays)
    if secure is not None:
        content["secagg"] = ConfigRecord(secure)
    reply = Message(content=content, reply_to=msg)
    path = ledger.ledger_path(context.node_config, site.cache_dir, site.site_name)
    ledger.append(path, ledger.reply_entry(msg, reply, site.site_name, masked=masked))
    return reply


def _secure_record(msg: Message, context: Context, site: SiteConfig, policy: SitePolicy, step: str):
    """The request's secure-aggregation record, with the shares it relays taken in; None for a plain
    request, which a site whose policy requires secure aggregation refuses."""
    record = msg.content.config_records.get("secagg")
    if record is None:
        if policy.require_secure_aggregation:
            raise PolicyRefusal(
                f"site {site.site_name}: refuses {step} without secure aggregation "
                f"(require-secure-aggregation in {policy.file_name}); run with secure-aggregation = true"
            )
        return None
    if "from" in record:
        secagg.receive_shares(record, context.state)
    return record


def handle_train(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    from client import tasks

    cfg, site, policy, deadline = _setup(context, overrides)
    config = msg.content["config"]
    phase, phase_round = str(config["phase"]), int(config["phase-round"])
    secure = _secure_record(msg, context, site, policy, "training")
    # FedBN: the site's own normalisation layers live in its cache dir, not in ``context.state``,
    # so that they survive a restart of the site or of the simulation (a resumed run).
    before = tasks.load_local_layers(site, cfg, phase, before=phase_round) if cfg.fedbn else None
    if cfg.fedbn and before is None and phase == "stage":  # the first staging round: from phase 1's
        before = tasks.stage_layers_from_pretraining(site, cfg)
    sent = from_record(msg.content["arrays"])
    arrays, metrics, local = tasks.train_round(phase, site, cfg, sent, phase_round, before, deadline.check)
    if cfg.fedbn and local:
        tasks.save_local_layers(site, cfg, phase, phase_round, local)
    if secure is None:
        return _reply(msg, context, site, metrics, arrays)
    masked = _masked_update(context, site, cfg, phase, secure, sent, arrays, metrics)
    kept = {k: metrics[k] for k in ("num-examples", "train-seconds") if k in metrics}
    return _reply(msg, context, site, kept, {"masked": masked}, masked=True)


def _masked_update(
    context: Context,
    site: SiteConfig,
    cfg: RunConfig,
    phase: str,
    secure: ConfigRecord,
    sent: dict,
    arrays: dict,
    metrics: dict,
) -> np.ndarray:
    """The site's training contribution, masked: its update weighted by its share of examples
    (under DP: clipped here to ``dp-clip-norm``, unweighted, as the server cannot clip a masked update)."""
    n = float(metrics.get("num-examples", 0))
    update = update_of(arrays, sent)
    if cfg.dp_noise_multiplier > 0 and cfg.dp_phases in ("both", phase):
        update, _ = clip_update(update, cfg.dp_clip_norm)
        weight = 1.0 if n > 0 else 0.0
    else:
        weight = min(1.0, n / max(1.0, float(secure["max-examples"])))
    vector, clipped = secagg.encode_update(
        training_vector(update, weight, float(metrics.get("loss", 0.0))), cfg.secagg_clip_range
    )
    if clipped:
        log.warning(
            "site %s: %d update values beyond secagg-clip-range %g were clipped before masking",
            site.site_name,
            clipped,
            cfg.secagg_clip_range,
        )
    return secagg.mask(context.state, str(secure["session"]), "train", vector)


def handle_evaluate(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    from client import tasks

    cfg, site, policy, deadline = _setup(context, overrides)
    config = msg.content["config"]
    phase, split = str(config.get("phase", "stage")), str(config.get("split", "val"))
    secure = _secure_record(msg, context, site, policy, "evaluation")
    # FedBN: the site's layers of the round whose global weights these are (the final test may
    # send an earlier, best-validated round's), else its latest.
    model_round = int(config["model-round"]) if "model-round" in config else None
    local = (
        tasks.load_local_layers(site, cfg, phase, before=model_round and model_round + 1)
        if cfg.fedbn
        else None
    )
    arrays = from_record(msg.content["arrays"])
    # A masked evaluation is no release of this site's own: the server sees only the sum over at
    # least ``threshold`` sites, so the per-site release bounds do not apply to it.
    # (A site without a hip in the split adds zeros.)
    release = ReleaseBounds(min_hips=1, max_bins=cfg.histogram_bins) if secure is not None else policy.release
    metrics = tasks.evaluate_round(phase, split, site, cfg, arrays, local, deadline.check, release)
    if secure is None:
        return _reply(msg, context, site, metrics)
    session = str(secure["session"])
    sites = secagg.session_sites(context.state, session)
    scale = evaluation_scale(phase, cfg.histogram_bins)
    vector = encode_counts(evaluation_vector(phase, metrics, cfg.histogram_bins), sites, scale)
    masked = secagg.mask(context.state, session, "evaluate", vector)
    return _reply(
        msg, context, site, {"num-examples": metrics["num-examples"]}, {"masked": masked}, masked=True
    )


_SECURE_STEPS = {
    "secagg-keys": secagg.keys_reply,
    "secagg-shares": secagg.shares_reply,
    "secagg-unmask": secagg.unmask_reply,
}


def handle_query(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """Site inventory (the site's name and how much data each phase can use: counts only), a step
    of secure aggregation (:mod:`client.secagg`), or the run's final model (:mod:`client.delivery`)."""
    cfg, site, _, _ = _setup(context, overrides)
    config = msg.content["config"]
    step = _SECURE_STEPS.get(str(config.get("query", "inventory")))
    if step is not None:
        return _reply(msg, context, site, {}, secure=step(config, context.state))
    if config.get("query") == "deliver":  # the run's final model: kept here, only an acknowledgement leaves
        from client import delivery

        card = json.loads(str(config["card"]))
        delivery.save_delivered_model(
            context.node_config, site, cfg, from_record(msg.content["arrays"]), card
        )
        return _reply(msg, context, site, {"delivered": 1})
    from client import tasks

    return _reply(msg, context, site, tasks.inventory(site, cfg))


def make_client_app(overrides: dict[str, Any] | None = None, site_policy: str | None = None) -> ClientApp:
    """A ClientApp whose run config is pyproject's ``[tool.flwr.app.config]`` plus ``overrides``.

    ``site_policy``: a policy file every site without its own node config ``policy-file`` uses
    (a simulation's sites; a deployed site names its own in its node config).
    """
    overrides = dict(overrides or {})
    app = ClientApp()

    def guarded(step: str, handler: Callable[..., Message], msg: Message, context: Context) -> Message:
        if site_policy and not context.node_config.get("policy-file"):
            context.node_config["policy-file"] = site_policy
        return _guarded(step, handler, msg, context, overrides)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return guarded("training", handle_train, msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return guarded("evaluation", handle_evaluate, msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        query = str(msg.content["config"].get("query", ""))
        step = (
            "secure aggregation"
            if query.startswith("secagg-")
            else "model delivery"
            if query == "deliver"
            else "inventory"
        )
        return guarded(step, handle_query, msg, context)

    return app


app = make_client_app()
