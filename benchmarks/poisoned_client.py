"""A benchmark-only ClientApp: the project's own site handlers, with named sites poisoning their staging replies.

Nothing here is reachable from production code: the honest path is ``client.client_app``'s own
``handle_train`` / ``handle_evaluate`` / ``handle_query``, called unchanged. For the sites named in
an :class:`Attack`, the training reply of the staging phase (phase 2) is replaced or perturbed:

- ``sign-flip``: ``global - k * (local - global)`` (the honest update reversed, ``k`` times as long);
- ``scale``: ``global + s * (local - global)`` (the honest update ``s`` times as long);
- ``shuffled-labels``: a normal round of local training on the site's own hips with their stage
  labels permuted (a fixed permutation per site, the class counts unchanged);
- ``free-rider``: the global model sent back unchanged, claiming ``claimed_examples`` hips;
- ``free-rider-inventory``: the same, and the site's inventory reply (the server's cap on
  ``num-examples``) claims ``claimed_examples`` labelled training hips too.

Perturbed weights stay finite and BatchNorm running variances stay positive (floored), so the
server's checks of names, shapes, dtypes and finiteness pass them: the attack must be stopped by
the aggregation rule, a norm bound or the bound on ``num-examples``, not by a NaN. Evaluation and
inventory replies of every site, and all of phase 1, are honest.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import client_app, tasks
from common.config import RunConfig, SiteConfig
from common.models.factory import build_staging
from common.records import from_record, to_record
from common.training.datasets import HipDataset
from common.training.device import seed_everything
from common.training.loops import train_staging
from common.training.weights import get_shared_state, set_shared_state

ATTACKS = ("sign-flip", "scale", "shuffled-labels", "free-rider", "free-rider-inventory")
VARIANCE_FLOOR = 1e-3  # BatchNorm running variance after a perturbation: positive, so the model stays finite


@dataclass(frozen=True)
class Attack:
    """Which sites poison their staging replies, and how.

    Attributes:
        kind: one of ``ATTACKS``.
        sites: site names (``site-NN`` in simulation) that attack; every other site is honest.
        flip_factor: ``k`` of the sign flip.
        scale: ``s`` of the scaled update.
        claimed_examples: the free-rider's ``num-examples``.
    """

    kind: str
    sites: tuple[str, ...]
    flip_factor: float = 3.0
    scale: float = 10.0
    claimed_examples: int = 10_000

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"attack {self.kind!r} is not one of {', '.join(ATTACKS)}")


def perturb(
    global_arrays: dict[str, np.ndarray], local: dict[str, np.ndarray], factor: float
) -> dict[str, np.ndarray]:
    """``global + factor * (local - global)`` for every float array (``factor < 0`` flips the update)."""
    out: dict[str, np.ndarray] = {}
    for key, value in local.items():
        if not np.issubdtype(value.dtype, np.floating):
            out[key] = value
            continue
        g = np.asarray(global_arrays[key], dtype=np.float32)
        moved = g + np.float32(factor) * (np.asarray(value, dtype=np.float32) - g)
        if key.endswith("running_var"):
            moved = np.maximum(moved, np.float32(VARIANCE_FLOOR))
        out[key] = moved.astype(value.dtype)
    return out


def shuffled_stages(stages: np.ndarray, site_name: str) -> np.ndarray:
    """The site's labels in a fixed per-site random order (the same permutation every round)."""
    return np.random.default_rng(zlib.crc32(site_name.encode())).permutation(stages)


def train_on_shuffled_labels(
    site: SiteConfig, cfg: RunConfig, global_arrays: dict[str, np.ndarray], phase_round: int
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``client.tasks.train_round``'s staging branch, on permuted labels (same seed, same budget)."""
    started = time.time()
    data = tasks.site_data(site, cfg)
    seed = tasks.round_seed(cfg, "stage", phase_round, site.site_name)
    seed_everything(seed)
    net = build_staging(cfg.model)
    set_shared_state(net, global_arrays)
    images, available, stages = data.staging_set("train")
    if len(stages) == 0:
        return global_arrays, {"num-examples": 0, "loss": 0.0, "train-seconds": 0.0}
    stats = train_staging(
        net,
        HipDataset(images, available, shuffled_stages(stages, site.site_name)),
        cfg.stage_training(seed),
        reference_state={k: v.copy() for k, v in global_arrays.items()},
    )
    metrics = {
        "num-examples": int(stats["n_samples"]),
        "loss": float(stats["loss"]),
        "train-seconds": float(time.time() - started),
    }
    return get_shared_state(net, cfg.fedbn, cfg.update_dtype), metrics


def _reply(msg: Message, site: SiteConfig, metrics: dict, arrays: dict[str, np.ndarray]) -> Message:
    """A training reply shaped as ``client.client_app`` shapes it: metrics, site name, arrays."""
    content = RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"site-name": site.site_name}),
            "arrays": to_record(arrays),
        }
    )
    return Message(content=content, reply_to=msg)


def _site(context: Context, overrides: dict[str, Any]) -> tuple[RunConfig, SiteConfig]:
    cfg = RunConfig.from_dict({**dict(context.run_config), **overrides})
    return cfg, SiteConfig.from_node_config(dict(context.node_config), cfg)


def poisoned_train(msg: Message, context: Context, overrides: dict[str, Any], attack: Attack) -> Message:
    """The honest training reply, or for an attacking site in the staging phase a poisoned one."""
    cfg, site = _site(context, overrides)
    config = msg.content["config"]
    phase, phase_round = str(config["phase"]), int(config["phase-round"])
    if phase != "stage" or site.site_name not in attack.sites:
        return client_app.handle_train(msg, context, overrides)
    global_arrays = from_record(msg.content["arrays"])
    if attack.kind.startswith("free-rider"):
        metrics = {"num-examples": attack.claimed_examples, "loss": 0.0, "train-seconds": 0.0}
        return _reply(msg, site, metrics, global_arrays)
    if attack.kind == "shuffled-labels":
        arrays, metrics = train_on_shuffled_labels(site, cfg, global_arrays, phase_round)
        return _reply(msg, site, metrics, arrays)
    reply = client_app.handle_train(msg, context, overrides)
    factor = -attack.flip_factor if attack.kind == "sign-flip" else attack.scale
    reply.content["arrays"] = to_record(perturb(global_arrays, from_record(reply.content["arrays"]), factor))
    return reply


def make_poisoned_client_app(
    overrides: dict[str, Any] | None = None, attack: Attack | None = None
) -> ClientApp:
    """``client.client_app.make_client_app`` with ``attack`` applied to its sites' staging replies
    (``attack=None``: every site honest, the clean run)."""
    overrides = dict(overrides or {})
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if attack is None:
            return client_app.handle_train(msg, context, overrides)
        return poisoned_train(msg, context, overrides, attack)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return client_app.handle_evaluate(msg, context, overrides)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        reply = client_app.handle_query(msg, context, overrides)
        if attack is not None and attack.kind == "free-rider-inventory":
            if _site(context, overrides)[1].site_name in attack.sites:
                for key in ("num-examples", "hips", "labelled-train"):
                    reply.content["metrics"][key] = attack.claimed_examples
        return reply

    return app
