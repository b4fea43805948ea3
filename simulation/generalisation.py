"""How a model does at a hospital that did not take part: leave-one-site-out and foreign sites.

Research tooling over a synthetic federation, where one process may read every site (a real
federation cannot: each figure below is what a site would compute locally with ``onfh evaluate``).

- :func:`federated_model` trains a federation of a chosen subset of sites (run-config
  ``simulated-sites``) in Flower's simulation runtime; the sites left out are never started.
- :func:`centralized_model` trains the pooled baseline on the same subset.
- :func:`score` scores one site's labelled ``test`` hips with a model folder, as delivered or
  after adapting its batch statistics to the site's unlabelled hips (:mod:`common.adapt`).
- :func:`leave_one_site_out` trains without each site in turn and scores the site left out.

Scores are kept hip by hip (``Scored``) so that figures pooled over sites come with intervals that
resample patients, and two models scored on the same hips can be compared pairwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import cohen_kappa_score

from common.adapt import adapt_batch_statistics
from common.config import RunConfig, SiteConfig
from common.evaluate import (
    aurocs,
    expected_calibration_error,
    paired_bootstrap,
    patient_bootstrap,
    reliability_bins,
    site_scores,
)
from common.predict import load_model
from common.sitedata.load import SiteData, load_site
from common.training.evaluation import stage_rates
from common.training.metrics import adjacent_stage_aurocs

Progress = Callable[[str], None]


@dataclass
class Scored:
    """Hip-level scores of one model on some sites' test hips (patients prefixed by their site)."""

    probs: np.ndarray
    labels: np.ndarray
    patients: np.ndarray

    @staticmethod
    def join(parts: Iterable[Scored]) -> Scored:
        parts = list(parts)
        return Scored(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("probs", "labels", "patients"))
        )

    def summary(self, reps: int = 1000) -> dict:
        """Macro and per-stage AUROC with 95% intervals that resample patients; hip and patient counts;
        accuracy, balanced accuracy, quadratic-weighted kappa, calibration error of the predicted stage
        and its reliability bins (:func:`common.evaluate.reliability_bins`), per-stage sensitivity and
        specificity, and the confusion matrix (rows: true stage I-IV)."""
        predicted = self.probs.argmax(1)
        confusion = np.zeros((4, 4), int)
        np.add.at(confusion, (self.labels, predicted), 1)
        true = confusion.sum(1)
        sensitivity, specificity = stage_rates(confusion)  # as the server computes them from the sum
        return {
            "hips": int(len(self.labels)),
            "patients": int(len(np.unique(self.patients))),
            **aurocs(self.probs, self.labels),
            "adjacent-auroc": {  # does the model order neighbouring stages (None: a stage absent)
                pair: value if np.isfinite(value) else None
                for pair, value in adjacent_stage_aurocs(self.probs, self.labels).items()
            },
            "ci95": patient_bootstrap(self.probs, self.labels, self.patients, reps),
            "accuracy": float((predicted == self.labels).mean()),
            "balanced-accuracy": float(np.nanmean(sensitivity)) if true.any() else float("nan"),
            "qw-kappa": float(
                cohen_kappa_score(self.labels, predicted, labels=range(4), weights="quadratic")
            ),
            "ece": expected_calibration_error(self.probs.max(1), predicted == self.labels),
            "reliability": reliability_bins(self.probs.max(1), predicted == self.labels),
            "sensitivity": [float(v) for v in sensitivity],
            "specificity": [float(v) for v in specificity],
            "confusion": confusion.tolist(),
        }

    def versus(self, other: Scored, reps: int = 1000, statistic: Callable | None = None) -> dict:
        """Paired comparison on the same hips (``self`` minus ``other``), patients resampled, of the
        macro AUROC or of ``statistic(probs, labels)``."""
        if not np.array_equal(self.patients, other.patients) or not np.array_equal(self.labels, other.labels):
            raise ValueError(
                "a paired comparison needs both models scored on the same hips, in the same order"
            )
        chosen = {"statistic": statistic} if statistic is not None else {}
        return paired_bootstrap(self.probs, other.probs, self.labels, self.patients, reps, **chosen)

    def to_json(self) -> dict:
        return {
            "probs": self.probs.tolist(),
            "labels": self.labels.tolist(),
            "patients": self.patients.tolist(),
        }

    @staticmethod
    def from_json(raw: dict) -> Scored:
        return Scored(np.asarray(raw["probs"]), np.asarray(raw["labels"]), np.asarray(raw["patients"]))


def site_data(cfg: RunConfig, site_dir: Path) -> SiteData:
    """A site's preprocessed hips, from (or into) its cache under ``cfg.cache_dir``."""
    return load_site(
        site_dir,
        Path(cfg.cache_dir) / site_dir.name,
        cfg.preprocess,
        split_seed=cfg.split_seed,
        fractions=cfg.split,
    )


def score_net(net: torch.nn.Module, data: SiteData, split: str = "test") -> Scored:
    """``net`` on ``data``'s labelled hips of ``split`` (the test hips unless told)."""
    scores = site_scores(net, data, (split,))
    patients = np.asarray([f"{data.name}/{p}" for p in scores["patients"]])
    return Scored(scores["probs"], scores["labels"], patients)


def score(model_dir: Path, data: SiteData, adapt: bool = False, split: str = "test") -> Scored:
    """The model of ``model_dir`` on ``data``'s labelled test hips; ``adapt``: its batch statistics
    first re-estimated on the site's train and val hips (stages not read)."""
    net, _, _ = load_model(model_dir)
    if adapt:
        images, available, _ = data.staging_set("train", "val")
        adapt_batch_statistics(net, images, available)
        net.eval()
    return score_net(net, data, split)


def federated_model(cfg: RunConfig, sites: list[str], run_name: str) -> Path:
    """The run folder of a federation of ``sites`` (folders under ``cfg.data_root``); a finished run
    of that name is reused."""
    from simulation.main_job import run_federated

    run = cfg.replace(run_name=run_name, simulated_sites=",".join(sites), resume=False)
    if not (run.run_dir / "final_model.npz").is_file():
        run_federated(run, len(sites))
    return run.run_dir


def delivered_model(cfg: RunConfig, site: str, run_name: str) -> Path:
    """Where a simulated site keeps the model delivered at the end of run ``run_name``."""
    from client.delivery import model_folder

    where = SiteConfig(site, Path(cfg.data_root) / site, Path(cfg.cache_dir) / site)
    return model_folder({}, where, cfg.replace(run_name=run_name))


def centralized_model(cfg: RunConfig, site_dirs: list[Path], out: Path) -> Path:
    """The pooled baseline (both phases, the federation's budget) on ``site_dirs``; reused if there."""
    from common.training.centralized import save_model, train_two_phase

    if not (out / "final_model.npz").is_file():
        net, info = train_two_phase([site_data(cfg, d) for d in site_dirs], cfg)
        save_model(net.cpu(), cfg, out, {"sites": info["sites"], "seconds": info.get("seconds")})
    return out


def leave_one_site_out(
    cfg: RunConfig,
    site_dirs: list[Path],
    out: Path,
    fedbn: bool = False,
    centralized: bool = True,
    progress: Progress = print,
) -> dict[str, dict]:
    """For each site in turn: train without it (federated, and pooled when ``centralized``), then
    score its test hips. Returns ``{site: {"federated": run folder, "centralized": folder or None,
    "scores": {condition: Scored}}}`` with conditions ``federated`` (FedAvg only: as delivered),
    ``federated+adabn``, and ``centralized``, ``centralized+adabn``."""
    kind = "fedbn" if fedbn else "fedavg"
    folds: dict[str, dict] = {}
    for held_out in site_dirs:
        train = [d for d in site_dirs if d != held_out]
        progress(
            f"leave-one-site-out ({kind}): training on {', '.join(d.name for d in train)}, {held_out.name} held out"
        )
        run_dir = federated_model(
            cfg.replace(fedbn=fedbn), [d.name for d in train], f"loso-{kind}-without-{held_out.name}"
        )
        data = site_data(cfg, held_out)
        scores = {"federated+adabn": score(run_dir, data, adapt=True)}
        if not fedbn:  # a FedBN model has no normalisation layers to use as delivered
            scores["federated"] = score(run_dir, data)
        central = None
        if centralized:
            central = centralized_model(cfg, train, out / f"centralized-without-{held_out.name}")
            scores["centralized"] = score(central, data)
            scores["centralized+adabn"] = score(central, data, adapt=True)
        folds[held_out.name] = {"federated": run_dir, "centralized": central, "scores": scores}
    return folds
