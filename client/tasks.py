"""What a site does in a round, in plain Python: no Flower types cross this module's boundary.

Each function takes the global weights as a ``name -> array`` dict and returns the site's
weights and aggregate metrics (counts and means only, never per-patient values). An evaluation
releases what the site's policy allows (:class:`client.policy.ReleaseBounds`): histograms of at
most ``max-release-bins`` bins, and nothing but a ``withheld`` mark below ``min-release-hips``. Under FedBN the
site's own normalisation layers are kept in its cache dir, per run name, phase and round, so a
restart or a resumed run trains on with them (:func:`save_local_layers`, :func:`load_local_layers`).
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from client.policy import ReleaseBounds
from common.config import RunConfig, SiteConfig
from common.files import save_npz_atomic
from common.models.factory import build_staging, build_translation
from common.models.transfer import load_pretrained_encoder
from common.sitedata.load import SiteData, load_site
from common.training.datasets import HipDataset, pretraining_pairs
from common.training.device import seed_everything
from common.training.evaluation import site_evaluation
from common.training.loops import evaluate_translation, predict_staging, train_staging, train_translation
from common.training.weights import get_local_state, get_shared_state, set_shared_state

log = logging.getLogger("onfh.client")

LocalState = dict[str, np.ndarray]
# Called between the steps of a task with what was just done; raises to stop the task (the site
# policy's wall-time bound, client.policy.Deadline.check).
TaskCheck = Callable[[str], None]


def _no_check(done: str) -> None:
    """The check of a task without a wall-time bound."""


DEFAULT_RELEASE = ReleaseBounds()  # the release bounds of a site without a policy file


_LOADED: dict[tuple, SiteData] = {}


def site_data(site: SiteConfig, cfg: RunConfig) -> SiteData:
    """The site's data, from this process's memo or else the on-disk cache (built if needed).

    A simulation worker serves several sites in turn, so a few are kept in memory.
    """
    key = (site.data_dir, site.cache_dir, site.site_name, cfg.preprocess, cfg.split_seed, cfg.split)
    if key not in _LOADED:
        if len(_LOADED) >= 4:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = load_site(
            site.data_dir,
            site.cache_dir,
            cfg.preprocess,
            split_seed=cfg.split_seed,
            fractions=cfg.split,
            name=site.site_name,
        )
    return _LOADED[key]


def inventory(site: SiteConfig, cfg: RunConfig) -> dict[str, int]:
    """How much each phase can use at this site (counts only)."""
    data = site_data(site, cfg)
    return {
        "num-examples": int(len(data.stages)),
        "hips": int(len(data.stages)),
        "labelled-train": int(len(data.staging_set("train")[2])),
        "labelled-val": int(len(data.staging_set("val")[2])),
        "labelled-test": int(len(data.staging_set("test")[2])),
        "pairs": int(len(data.pairs_mr)),
    }


def round_seed(cfg: RunConfig, phase: str, phase_round: int, site_name: str) -> int:
    """Deterministic per (run seed, phase, round, site): a resumed run repeats the same steps."""
    return (cfg.seed * 1_000_003 + zlib.crc32(f"{phase}/{phase_round}/{site_name}".encode())) % (2**31)


def folder_name(text: str, default: str) -> str:
    """``text`` (a site or run name, which may come from the server) as one plain folder name."""
    return re.sub(r"[^\w.-]", "_", text or default).lstrip(".") or default


def local_layers_dir(site: SiteConfig, cfg: RunConfig, phase: str) -> Path:
    """Where FedBN keeps this site's own normalisation layers of one run and phase (never sent).

    The run name comes from the server: only its plain characters name a folder of the site.
    """
    return Path(site.cache_dir) / "fedbn" / folder_name(cfg.run_name, "run") / phase


def _saved_rounds(folder: Path) -> dict[int, Path]:
    rounds: dict[int, Path] = {}
    for path in folder.glob("round-*.npz"):
        number = path.stem.removeprefix("round-")
        if number.isdigit():
            rounds[int(number)] = path
    return rounds


def load_local_layers(
    site: SiteConfig, cfg: RunConfig, phase: str, before: int | None = None
) -> LocalState | None:
    """The site's FedBN layers as its latest training round left them (the latest before round
    ``before`` when given: a round repeated after a resume starts from what the one before left)."""
    rounds = _saved_rounds(local_layers_dir(site, cfg, phase))
    usable = [r for r in rounds if before is None or r < before]
    if not usable:
        return None
    with np.load(rounds[max(usable)]) as data:
        return {k: data[k] for k in data.files}


def stage_layers_from_pretraining(site: SiteConfig, cfg: RunConfig) -> LocalState | None:
    """FedBN at the phase-1 to phase-2 transfer: the staging network's normalisation layers with the
    encoder's taken from this site's own pretraining layers (as the server transfers the shared
    encoder weights); None when the site kept none (no pretraining, or no FedBN then)."""
    pretrained = load_local_layers(site, cfg, "pretrain")
    if not cfg.pretrained or not pretrained:
        return None
    translation, staging = build_translation(cfg.model), build_staging(cfg.model)
    set_shared_state(translation, pretrained)
    load_pretrained_encoder(
        staging, translation.state_dict()
    )  # the rest of the encoder is overwritten by the server's
    return get_local_state(staging)


def save_local_layers(
    site: SiteConfig, cfg: RunConfig, phase: str, phase_round: int, local: LocalState
) -> None:
    """Keep round ``phase_round``'s FedBN layers in the site's cache (atomically), beside every
    earlier round's: a repeat of a round after a resume starts from the one before, and the final
    test pairs the best-validated round's global weights with that round's layers (a few kB each)."""
    folder = local_layers_dir(site, cfg, phase)
    save_npz_atomic(folder / f"round-{phase_round:04d}.npz", local)
    for number, path in _saved_rounds(folder).items():
        if number > phase_round:  # later rounds left by an earlier run of this name
            path.unlink(missing_ok=True)


def _model(phase: str, cfg: RunConfig, global_arrays: dict[str, np.ndarray], local: LocalState | None):
    net = build_translation(cfg.model) if phase == "pretrain" else build_staging(cfg.model)
    set_shared_state(net, global_arrays)
    if cfg.fedbn and local:
        set_shared_state(net, local)  # the site's own normalisation layers (FedBN)
    return net


def train_round(
    phase: str,
    site: SiteConfig,
    cfg: RunConfig,
    global_arrays: dict[str, np.ndarray],
    phase_round: int,
    local: LocalState | None,
    check: TaskCheck = _no_check,
) -> tuple[dict[str, np.ndarray], dict[str, float], LocalState]:
    """One round of local training. Returns (weights to send, metrics, local state to keep).

    ``check`` is called once the site's data are loaded and after every local epoch.
    """
    started = time.time()
    data = site_data(site, cfg)
    check("loading the site data")
    seed = round_seed(cfg, phase, phase_round, site.site_name)
    seed_everything(seed)
    net = _model(phase, cfg, global_arrays, local)
    reference = {k: v.copy() for k, v in global_arrays.items()}
    if phase == "pretrain":
        mr, ct = data.pair_set("train", "val")
        if len(mr) == 0:  # no MR-CT pairs at this site: it sits this phase out
            return global_arrays, {"num-examples": 0, "loss": 0.0, "train-seconds": 0.0}, local or {}
        if len(mr) > cfg.pretrain_max_pairs:
            pick = np.random.default_rng(seed).choice(len(mr), cfg.pretrain_max_pairs, replace=False)
            mr, ct = mr[np.sort(pick)], ct[np.sort(pick)]
        stats = train_translation(
            net,
            pretraining_pairs(mr, ct, cfg.pretrain_target, seed),
            cfg.pretrain_training(seed),
            reference_state=reference,
            progress=check,
        )
    else:
        images, available, stages = data.staging_set("train")
        if len(stages) == 0:
            return global_arrays, {"num-examples": 0, "loss": 0.0, "train-seconds": 0.0}, local or {}
        stats = train_staging(
            net,
            HipDataset(images, available, stages),
            cfg.stage_training(seed, phase_round),
            reference_state=reference,
            progress=check,
        )
    metrics = {
        "num-examples": int(stats["n_samples"]),
        "loss": float(stats["loss"]),
        "train-seconds": float(time.time() - started),
    }
    return (
        get_shared_state(net, cfg.fedbn, cfg.update_dtype),
        metrics,
        get_local_state(net) if cfg.fedbn else {},
    )


def withheld_evaluation(release: ReleaseBounds) -> dict[str, float]:
    """The whole evaluation reply of a site with fewer hips (or patients) than ``min-release-hips``:
    no metric, ``num-examples`` 0 so that the server pools nothing from it."""
    return {"num-examples": 0, "withheld": 1, "min-release-hips": int(release.min_hips)}


def evaluate_round(
    phase: str,
    split: str,
    site: SiteConfig,
    cfg: RunConfig,
    global_arrays: dict[str, np.ndarray],
    local: LocalState | None,
    check: TaskCheck = _no_check,
    release: ReleaseBounds = DEFAULT_RELEASE,
) -> dict[str, float | list[float]]:
    """Score the global model on the site's own ``split`` hips (or pairs); aggregates only.

    What is released follows ``release`` (the site's policy): below ``release.min_hips`` hips
    (pretraining: patients with MR-CT pairs) only :func:`withheld_evaluation`, before anything is
    scored; histograms with ``release.bins(cfg.histogram_bins)`` bins. ``check`` is called once
    the site's data are loaded (the scoring pass is not interrupted).
    """
    data = site_data(site, cfg)
    check("loading the site data")
    if phase == "pretrain":
        mr, ct = data.pair_set(split)
        patients = {str(k) for k in data.pair_keys if data.split.get(str(k)) == split}
        if release.withholds(len(patients)):
            return withheld_evaluation(release)
        m = evaluate_translation(  # under "mr-denoise" the "HU" are the MR target's, scaled as CT's
            _model(phase, cfg, global_arrays, local),
            pretraining_pairs(mr, ct, cfg.pretrain_target),
            ct_window_hu=cfg.preprocess.ct_window_hu,
        )
        return {
            "num-examples": int(len(mr)),
            "mae-hu": float(m["mae_hu"]),
            "psnr": float(m["psnr"]),
            "ssim": float(m["ssim"]),
        }
    images, available, stages = data.staging_set(split)
    if release.withholds(len(stages)):
        return withheld_evaluation(release)
    net = _model(phase, cfg, global_arrays, local)
    probs, labels = predict_staging(net, HipDataset(images, available, stages))
    return site_evaluation(probs, labels, bins=release.bins(cfg.histogram_bins))
