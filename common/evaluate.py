"""``onfh evaluate SITE_DIR --model MODEL_DIR``: a hospital validates a model on its own labelled hips.

Everything runs and stays at the site. The hips are preprocessed as in training (the model's run
config) and split as in training (the site's own salt and the run's ``split-seed``), so the
``test`` split is the one the federation's final test scored at this site. Reported: macro and
per-stage AUROC (exact: Mann-Whitney, equal to scikit-learn's) with 95% confidence intervals from a bootstrap that
resamples *patients* (the two hips of a patient move together), the confusion matrix, balanced
accuracy, calibration (expected calibration error of the predicted stage, reliability diagram PNG)
and a breakdown by which protocols were available.

``--recalibrate`` fits, on the site's validation split, one monotone (Platt) map per stage from the
model's probability of that stage to a calibrated one-vs-rest probability, and saves it beside the
model (``recalibration.json``). Each map only increases, so no stage's AUROC can change; the
predicted stage (the model's arg-max) is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from common.cli import description
from common.predict import STAGE_NAMES, load_model
from common.sitedata.load import SiteData, load_site
from common.training.datasets import HipDataset
from common.training.loops import predict_staging
from common.training.metrics import one_vs_rest_aurocs

BOOTSTRAP = 1000
ECE_BINS = 10
EPS = 1e-15  # probabilities are clipped this far from 0 and 1 before their logit (no new ties)


def hip_scores(site_dir: Path, model_dir: Path, splits: tuple[str, ...], cache: Path) -> dict:
    """Probabilities, labels (0..3), patient keys and protocol availability of the site's labelled
    hips in ``splits``, scored by the model of ``model_dir``."""
    net, cfg, notes = load_model(model_dir)
    for note in notes:
        print(f"WARNING {note}", file=sys.stderr)
    data = load_site(site_dir, cache, cfg.preprocess, split_seed=cfg.split_seed, fractions=cfg.split)
    return site_scores(net, data, splits, where=str(site_dir))


def site_scores(
    net: torch.nn.Module, data: SiteData, splits: tuple[str, ...] = ("test",), where: str | None = None
) -> dict:
    """:func:`hip_scores` for a site already loaded and a network already built (``where``: the
    site's folder, for messages)."""
    images, available, stages = data.staging_set(*splits)
    if not len(stages):
        raise ValueError(
            f"{where or data.name} has no labelled hip in split(s) {', '.join(splits)}: check its labels.csv"
        )
    probs, labels = predict_staging(net, HipDataset(images, available, stages))
    return {
        "probs": probs,
        "labels": labels,
        "patients": np.asarray([str(k) for k in data.staging_patients(*splits)]),
        "available": available,
        "protocols": list(data.protocols),
    }


def aurocs(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-stage one-vs-rest AUROC (NaN where a stage has no positive or no negative) and their mean."""
    values = one_vs_rest_aurocs(probs, labels)
    out = {f"auroc-stage-{stage}": float(values[k]) for k, stage in enumerate(STAGE_NAMES)}
    defined = [v for v in out.values() if np.isfinite(v)]
    out["macro-auroc"] = float(np.mean(defined)) if defined else float("nan")
    return out


def patient_draws(patients: np.ndarray, reps: int, seed: int) -> Iterator[np.ndarray]:
    """Hip indices of ``reps`` bootstrap samples that draw patients with replacement (a patient's
    hips always together)."""
    rng = np.random.default_rng(seed)
    unique = np.unique(patients)
    rows = {p: np.flatnonzero(patients == p) for p in unique}
    for _ in range(reps):
        yield np.concatenate([rows[p] for p in rng.choice(unique, len(unique), replace=True)])


def patient_bootstrap(
    probs: np.ndarray, labels: np.ndarray, patients: np.ndarray, reps: int = BOOTSTRAP, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of every AUROC from resampling patients with replacement."""
    draws: dict[str, list[float]] = {}
    for picked in patient_draws(patients, reps, seed):
        for key, value in aurocs(probs[picked], labels[picked]).items():
            if np.isfinite(value):
                draws.setdefault(key, []).append(value)
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items()}


def macro(probs: np.ndarray, labels: np.ndarray) -> float:
    return aurocs(probs, labels)["macro-auroc"]


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray,
    reps: int = BOOTSTRAP,
    seed: int = 0,
    statistic: Callable[[np.ndarray, np.ndarray], float] = macro,
) -> dict[str, float]:
    """``statistic`` (macro AUROC unless told) of scores ``a`` minus that of ``b`` on the same hips:
    the difference, its 95% interval from resampling patients (both models see the same draw), and
    a two-sided bootstrap p-value (twice the smaller share of draws on either side of zero)."""
    draws = []
    for picked in patient_draws(patients, reps, seed):
        d = statistic(a[picked], labels[picked]) - statistic(b[picked], labels[picked])
        if np.isfinite(d):
            draws.append(d)
    diff = statistic(a, labels) - statistic(b, labels)
    d = np.asarray(draws)
    p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())) if len(d) else float("nan")
    low, high = np.percentile(d, [2.5, 97.5]) if len(d) else (float("nan"),) * 2
    return {"difference": float(diff), "ci95": (float(low), float(high)), "p": float(p)}


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width confidence bin over [0, 1] (the ECE's bins): ``hips`` in it, their mean
    ``confidence`` and ``accuracy`` (NaN where a bin is empty). A reliability diagram plots these."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    hips = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / hips
        accuracy = np.bincount(which, weights=np.asarray(correct, np.float64), minlength=bins) / hips
    return {"hips": hips.tolist(), "confidence": mean_confidence.tolist(), "accuracy": accuracy.tolist()}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of the predicted stage: the hip-weighted gap between confidence and accuracy per bin."""
    table = reliability_bins(confidence, correct, bins)
    hips = np.asarray(table["hips"])
    if not hips.sum():
        return 0.0
    gap = np.abs(np.asarray(table["confidence"]) - np.asarray(table["accuracy"]))
    return float((hips[hips > 0] * gap[hips > 0]).sum() / hips.sum())


def classwise_ece(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over stages of the ECE of each one-vs-rest probability (what per-stage recalibration fits)."""
    return float(
        np.mean([expected_calibration_error(probs[:, k], labels == k) for k in range(probs.shape[1])])
    )


def fit_recalibration(probs: np.ndarray, labels: np.ndarray) -> list[tuple[float, float]]:
    """Per stage ``(a, b)`` of ``sigmoid(a * logit(p) + b)``, fitted on validation hips; ``a > 0``
    keeps each map increasing (a stage without both classes, or a fit that would reverse the
    order, keeps the identity ``(1, 0)``)."""
    maps = []
    for k in range(probs.shape[1]):
        positive = labels == k
        if not 0 < positive.sum() < len(labels):
            maps.append((1.0, 0.0))
            continue
        x = _logit(probs[:, k]).reshape(-1, 1)
        fit = LogisticRegression(C=100.0).fit(x, positive)
        a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
        maps.append((a, b) if a > 0 else (1.0, 0.0))
    return maps


def apply_recalibration(probs: np.ndarray, maps: list[tuple[float, float]]) -> np.ndarray:
    """Calibrated one-vs-rest probabilities (columns no longer sum to 1: each answers "stage k?")."""
    return np.stack([expit(a * _logit(probs[:, k]) + b) for k, (a, b) in enumerate(maps)], axis=1)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def evaluate(scores: dict) -> dict:
    """The site's report from :func:`hip_scores`."""
    probs, labels, patients = scores["probs"], scores["labels"], scores["patients"]
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((4, 4), int)
    np.add.at(confusion, (labels, predicted), 1)
    report: dict = {
        "hips": int(len(labels)),
        "patients": int(len(np.unique(patients))),
        **aurocs(probs, labels),
    }
    report["ci95"] = patient_bootstrap(probs, labels, patients)
    report["balanced-accuracy"] = float(balanced_accuracy_score(labels, predicted))
    report["accuracy"] = float((predicted == labels).mean())
    report["confusion"] = confusion.tolist()  # rows: true stage I..IV, columns: predicted
    report["ece"] = expected_calibration_error(probs.max(axis=1), predicted == labels)
    report["classwise-ece"] = classwise_ece(probs, labels)
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(scores["available"]):
        name = "+".join(p for p, ok in zip(scores["protocols"], row, strict=True) if ok) or "none"
        groups.setdefault(name, []).append(i)
    report["by-protocols"] = {
        name: {"hips": len(idx), "accuracy": float((predicted[idx] == labels[idx]).mean()),
               "macro-auroc": aurocs(probs[idx], labels[idx])["macro-auroc"]}
        for name, idx in sorted(groups.items())
    }  # fmt: skip
    return report


def plot_reliability(probs: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Reliability diagram of the predicted stage: accuracy against confidence per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    table = reliability_bins(confidence, correct)
    filled = [b for b, n in enumerate(table["hips"]) if n]
    centres = [(b + 0.5) / ECE_BINS for b in filled]
    accuracy = [table["accuracy"][b] for b in filled]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.bar(centres, accuracy, width=1 / ECE_BINS, alpha=0.6, edgecolor="k", label="accuracy in bin")
    ece = expected_calibration_error(confidence, correct)
    ax.set(
        xlabel="confidence of the predicted stage", ylabel="accuracy", title=f"Reliability (ECE {ece:.3f})"
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(report: dict) -> str:
    ci = report["ci95"]
    lines = [
        f"{report['hips']} hips of {report['patients']} patients",
        "",
        "| figure | value | 95% CI (patients resampled) |",
        "|---|---|---|",
    ]
    for key in ["macro-auroc", *[f"auroc-stage-{s}" for s in STAGE_NAMES]]:
        value, interval = report[key], ci.get(key)
        shown = f"{value:.3f}" if np.isfinite(value) else "- (stage absent)"
        lines.append(
            f"| {key} | {shown} | " + (f"{interval[0]:.3f} - {interval[1]:.3f} |" if interval else "- |")
        )
    for key in ("balanced-accuracy", "accuracy", "ece", "classwise-ece"):
        lines.append(f"| {key} | {report[key]:.3f} | |")
    lines += ["", "confusion (rows true I-IV, columns predicted I-IV): " + str(report["confusion"]), "",
              "| protocols available | hips | accuracy | macro AUROC |", "|---|---|---|---|"]  # fmt: skip
    for name, g in report["by-protocols"].items():
        auroc = f"{g['macro-auroc']:.3f}" if np.isfinite(g["macro-auroc"]) else "-"
        lines.append(f"| {name} | {g['hips']} | {g['accuracy']:.3f} | {auroc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``onfh evaluate``: 0 on success, 2 on a user error, with a message naming the file and the fix."""
    parser = argparse.ArgumentParser(prog="onfh evaluate", description=description(__doc__))
    parser.add_argument("site_dir", type=Path, help="the site's export: DICOM folders + labels.csv")
    parser.add_argument("--model", type=Path, required=True, help="model folder (delivered, or a run folder)")
    parser.add_argument("--split", default="test", choices=("test", "val", "train", "all"))
    parser.add_argument(
        "--cache", type=Path, default=None, help="preprocessing cache (default: a temporary one)"
    )
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: MODEL/evaluation)")
    parser.add_argument(
        "--recalibrate", action="store_true", help="fit per-stage calibration on the val split"
    )
    args = parser.parse_args(argv)
    splits = ("train", "val", "test") if args.split == "all" else (args.split,)
    out = args.out or args.model / "evaluation"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cache = args.cache or Path(tmp)
            scores = hip_scores(args.site_dir, args.model, splits, cache)
            report = evaluate(scores)
            if args.recalibrate:
                val = hip_scores(args.site_dir, args.model, ("val",), cache)
                maps = fit_recalibration(val["probs"], val["labels"])
                calibrated = apply_recalibration(scores["probs"], maps)
                report["recalibrated"] = {
                    "classwise-ece": classwise_ece(calibrated, scores["labels"]),
                    "classwise-ece-val-before": classwise_ece(val["probs"], val["labels"]),
                    "classwise-ece-val-after": classwise_ece(
                        apply_recalibration(val["probs"], maps), val["labels"]
                    ),
                    **{k: v for k, v in aurocs(calibrated, scores["labels"]).items()},
                }
                (args.model / "recalibration.json").write_text(
                    json.dumps({"platt": maps, "stages": list(STAGE_NAMES)}, indent=2)
                )
    except (ValueError, OSError) as exc:
        print(f"onfh evaluate: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    plot_reliability(scores["probs"], scores["labels"], out / "reliability.png")
    print(_table(report))
    if "recalibrated" in report:
        r = report["recalibrated"]
        print(f"\nrecalibration (fitted on val): classwise ECE on val {r['classwise-ece-val-before']:.3f} -> "
              f"{r['classwise-ece-val-after']:.3f}; saved {args.model / 'recalibration.json'}")  # fmt: skip
    print(f"\nreport: {out / 'evaluation.json'}, reliability diagram: {out / 'reliability.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
