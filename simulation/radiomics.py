"""A simple radiomics baseline: intensity statistics of each hip's crop, multinomial logistic regression.

The phantom's difficulty is stated as bounds (docs/phantom.md, "Difficulty"): on the ``clinical``
phantom this baseline must stay well below the trained network, and on the ``easy`` phantom it
solves the task, which is what made ``easy`` measure nothing. It reads the same preprocessed hips
as the network (``SiteData.staging_set``), pooled over sites, and is fitted on training hips only.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.sitedata.load import SiteData
from common.training.metrics import macro_auroc

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def hip_features(images: np.ndarray, available: np.ndarray) -> np.ndarray:
    """Per protocol: quantiles, SD and mean absolute in-plane gradient of the crop's central half
    (the femoral head), and whether the protocol was acquired: ``(n, P * 8)``.

    Args:
        images: ``(n, P, K, H, W)`` hip crops (``SiteData.staging_set``).
        available: ``(n, P)`` which protocols exist (missing ones are zeros in ``images``).
    """
    n, p, _, h, w = images.shape
    centre = images[:, :, :, h // 4 : h - h // 4, w // 4 : w - w // 4].reshape(n, p, -1)
    quantiles = np.moveaxis(np.quantile(centre, QUANTILES, axis=-1), 0, -1)
    spread = centre.std(axis=-1)[..., None]
    gradient = np.abs(np.diff(images, axis=-1)).mean(axis=(2, 3, 4))[..., None]
    features = np.concatenate([quantiles, spread, gradient, available[..., None].astype(np.float32)], axis=-1)
    return features.reshape(n, -1)


def _pooled(sites: list[SiteData], *splits: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [site.staging_set(*splits) for site in sites]
    parts = [(x, a, s) for x, a, s in parts if len(s)]
    features = np.concatenate([hip_features(x, a) for x, a, _ in parts])
    return features, np.concatenate([s for _, _, s in parts])


def _model():
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=5000))


def radiomics_cv_auroc(sites: list[SiteData], folds: int = 5, seed: int = 0) -> float:
    """Pooled macro AUROC of out-of-fold predictions over every labelled hip of ``sites``, folds
    drawn by patient (both hips of a patient in one fold): more hips per figure than one split."""
    x, y = _pooled(sites, "train", "val", "test")
    patients = np.concatenate(
        [[f"{s.name}/{p}" for p in s.staging_patients("train", "val", "test")] for s in sites]
    )
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(_model(), x, y, groups=patients, cv=cv, method="predict_proba")
    return float(macro_auroc(probs, y - 1))


def radiomics_scores(
    sites: list[SiteData], split: str = "val", fit_on: tuple[str, ...] = ("train",)
) -> tuple[np.ndarray, np.ndarray]:
    """Stage probabilities ``(N, 4)`` and class indices (stage - 1) of the labelled ``split`` hips of all
    sites, site by site in order, from a logistic regression fitted on their ``fit_on`` hips."""
    x_fit, y_fit = _pooled(sites, *fit_on)
    x_eval, y_eval = _pooled(sites, split)
    model = _model().fit(x_fit, y_fit)
    probs = np.zeros((len(y_eval), 4))
    probs[:, model.classes_ - 1] = model.predict_proba(x_eval)
    return probs, y_eval - 1  # stages 1-4 -> class indices


def radiomics_auroc(sites: list[SiteData], split: str = "val", fit_on: tuple[str, ...] = ("train",)) -> float:
    """Pooled macro AUROC on ``split`` of a logistic regression fitted on ``fit_on`` hips of all sites."""
    return float(macro_auroc(*radiomics_scores(sites, split, fit_on)))


def site_prior_auroc(
    sites: list[SiteData], split: str = "val", fit_on: tuple[str, ...] = ("train",)
) -> float:
    """Pooled macro AUROC on ``split`` when each hip is scored by its site's stage frequencies on
    ``fit_on`` hips: what knowing the site alone is worth (sites differ in scanner, which a
    network sees, and in stage mix), the floor a pooled AUROC must beat rather than 0.5."""
    probs, labels = [], []
    for site in sites:
        stages = site.staging_set(split)[2]
        if not len(stages):
            continue
        prior = np.bincount(site.staging_set(*fit_on)[2] - 1, minlength=4).astype(float) + 1e-3
        probs.append(np.tile(prior / prior.sum(), (len(stages), 1)))
        labels.append(stages - 1)
    return float(macro_auroc(np.concatenate(probs), np.concatenate(labels)))
