"""The site's copy of the model it helped train: written where the site keeps its models.

``deliver`` query (:mod:`server.delivery`): the final global weights and the model card. The site
writes, into node config ``model-dir`` (default: ``SITE-models`` beside its cache folder, so that
clearing the cache keeps it), a folder per run that ``onfh predict --model`` takes directly:
``final_model.npz`` (the whole staging network: under FedBN the global weights with this site's own
normalisation layers of the model's round), ``global_model.npz`` (the weights as the server sent
them), ``run_config.json``, ``model_card.json`` and ``model_card.md``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client import tasks
from common.config import RunConfig, SiteConfig
from common.evaluate import evaluate, site_scores
from common.files import save_npz_atomic, write_atomic
from common.model_card import card_markdown
from common.models.factory import build_staging
from common.predict import STAGE_NAMES
from common.sitedata.load import SiteData
from common.training.weights import set_shared_state

MODEL_DIR_KEY = "model-dir"  # node config


def model_folder(node_config: Mapping[str, Any], site: SiteConfig, cfg: RunConfig) -> Path:
    """Where this run's delivered model goes (the run name's plain characters name the folder)."""
    name = tasks.folder_name(site.site_name, "site")
    root = node_config.get(MODEL_DIR_KEY) or Path(site.cache_dir).absolute().parent / f"{name}-models"
    return Path(str(root)) / tasks.folder_name(cfg.run_name, "run")


def site_validation(net: torch.nn.Module, data: SiteData) -> dict:
    """This copy scored on the site's own test split (``onfh evaluate``'s figures, patients resampled
    for the intervals); written into the site's card only."""
    try:
        report = evaluate(site_scores(net, data, ("test",)))
    except ValueError as exc:  # e.g. no labelled test hip here
        return {"error": str(exc)}
    keys = ("macro-auroc", *(f"auroc-stage-{s}" for s in STAGE_NAMES), "accuracy", "balanced-accuracy", "ece")
    figures = {k: (float(report[k]) if np.isfinite(report[k]) else None) for k in keys}
    return {"hips": report["hips"], "patients": report["patients"], "figures": figures,
            "ci95": {k: list(v) for k, v in report["ci95"].items()}}  # fmt: skip


def save_delivered_model(
    node_config: Mapping[str, Any],
    site: SiteConfig,
    cfg: RunConfig,
    arrays: dict[str, np.ndarray],
    card: dict,
) -> Path:
    """Write the delivered model, its run config and its card; returns the folder."""
    folder = model_folder(node_config, site, cfg)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    net = build_staging(cfg.model)
    set_shared_state(net, arrays)
    personalised = False
    if cfg.fedbn:  # the site's own layers of the round whose global weights these are
        local = tasks.load_local_layers(site, cfg, "stage", before=int(card["run"]["model-round"]) + 1)
        if local:
            set_shared_state(net, local)
            personalised = True
    save_npz_atomic(
        folder / "final_model.npz", {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    )
    save_npz_atomic(folder / "global_model.npz", arrays)
    data = tasks.site_data(site, cfg)
    by_stage = {split: np.bincount(data.staging_set(split)[2], minlength=5)[1:].tolist()
                for split in ("train", "val", "test")}  # fmt: skip
    card = {**card, "site": {"name": site.site_name, "personalised": personalised,
                             "delivered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "labelled-hips-by-stage": by_stage,
                             "validation": site_validation(net, data)}}  # fmt: skip
    write_atomic(folder / "run_config.json", json.dumps(cfg.to_dict(), indent=2).encode())
    write_atomic(folder / "model_card.json", json.dumps(card, indent=2).encode())
    write_atomic(folder / "model_card.md", card_markdown(card).encode())
    return folder
