"""The ablation and the pretraining control on the evaluation federation, centralized and federated.

Per training seed and mode, six models that differ only in what the table names, each scored on the
same 348 test hips and compared with the full model of the same seed and mode (paired: the same
hips, patients resampled together):

    full model                 attention fusion, MR-to-CT pretraining (the reference)
    plain VGG                  plain fusion, no pretraining              (paper: full - this = +6.8)
    + pretraining              plain fusion, MR-to-CT pretraining        (paper: +2.6, "without fusion")
    no pretraining             attention fusion, no pretraining          (paper: +4.7, "without SSL")
    MR-to-lesion-blind-CT      pretrained on CT with lesion tissue at marrow HU (same patients, MR)
    MR-to-MR denoising         pretrained to denoise MR (``pretrain-target = "mr-denoise"``)

The control asks whether MR-to-CT pretraining helps because CT shows what MR hides: the share of the
pretraining gain (full minus no pretraining) that is lost when the CT no longer shows the lesion
(full minus lesion-blind). Every model has the evaluation budget (``presets/evaluation.toml``, the
main job's): equal pretraining pairs, rounds and epochs whatever the target.

Centralized: phase 1 once per seed and target (two single-thread processes); federated: both phases
in Flower's simulation runtime as ``onfh simulate`` runs them, the full model being
``benchmarks.evaluation``'s FedAvg run. The lesion-blind federation (same seed, only its CT differs)
is written on first use and cached with the evaluation caches' salts: its hips are the evaluation
federation's. Nothing here is chosen: the variants and the budget were fixed before any ran.

Results: ``benchmarks/results/evaluation_ablation.json`` (a cut run continues: hip scores are kept in
``SCORES``), the tables printed, ``docs/evaluation_ablation.png``.

Usage (from the repository root, after ``benchmarks.evaluation`` for the same seeds; on 2 cores about
35 min centralized and 45 min federated per seed):
    .venv/bin/python -m benchmarks.evaluation_ablation --modes centralized federated --seeds 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.evaluation import (
    DIFFICULTY,
    EVALUATION_SEED,
    PATIENTS,
    SITES,
    WORK,
    budget,
    earlier_results,
    evaluation_federation,
    seed_config,
)
from benchmarks.harness import command, delivered_federated, machine, markdown, mean_sd, site_dirs, write_json

BLIND = WORK / "lesion-blind"
SCORES = WORK / "ablation"
MODES = ("centralized", "federated")


@dataclass(frozen=True)
class Variant:
    """One model of the ablation or the control: its fusion and what phase 1 trains on."""

    name: str
    slug: str
    fusion: str = "attention"
    pretraining: str | None = "ct"  # "ct", "lesion-blind-ct", "mr-denoise" or None
    paper: float | None = None  # the paper's full-minus-this, in points


FULL = Variant("full model", "full")
VARIANTS = (
    FULL,
    Variant("plain VGG", "plain-vgg", "plain", None, 6.8),
    Variant("+ pretraining", "plain-pretrained", "plain", "ct", 2.6),
    Variant("no pretraining", "no-pretraining", "attention", None, 4.7),
    Variant("MR-to-lesion-blind-CT", "lesion-blind-ct", "attention", "lesion-blind-ct"),
    Variant("MR-to-MR denoising", "mr-denoise", "attention", "mr-denoise"),
)


def variant_config(seed: int, variant: Variant):
    """The run config of ``variant`` with training seed ``seed`` (the lesion-blind one reads the
    lesion-blind federation, whose hips are the evaluation federation's)."""
    cfg = seed_config(seed)
    if variant is FULL:
        return cfg  # benchmarks.evaluation's run of this seed
    changes = {
        "fusion": variant.fusion,
        "pretrained": variant.pretraining is not None,
        "pretrain_target": "mr-denoise" if variant.pretraining == "mr-denoise" else "ct",
        "run_name": f"{cfg.run_name}-{variant.slug}",
    }
    if variant.pretraining == "lesion-blind-ct":
        changes |= {
            "data_root": str((BLIND / "federation").resolve()),
            "cache_dir": str((BLIND / "cache").resolve()),
        }
    return cfg.replace(**changes)


def lesion_blind_federation(evaluation_dirs: list[Path]) -> list[Path]:
    """Write (or reuse) the evaluation federation with a lesion-blind CT, preprocessed into caches
    salted as the evaluation ones (the same patient keys, so the same hips in the same order). The
    evaluation federation's caches, whose salts these copy, are built first where missing."""
    from simulation.main_job import preprocess_sites
    from simulation.phantom.difficulty import difficulty_named
    from simulation.synth.federation import generate_federation

    source = seed_config(0)
    preprocess_sites(source, evaluation_dirs)  # a cache already built is only checked
    blind = difficulty_named(DIFFICULTY, ct_shows_lesions=False)
    data = generate_federation(
        BLIND / "federation", sites=SITES, patients=PATIENTS, seed=EVALUATION_SEED, difficulty=blind
    )
    dirs = site_dirs(data)
    cfg = variant_config(0, next(v for v in VARIANTS if v.pretraining == "lesion-blind-ct"))
    for d in dirs:
        salt = Path(cfg.cache_dir) / d.name / "pseudonym.salt"
        if not salt.is_file():
            salt.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(source.cache_dir) / d.name / "pseudonym.salt", salt)
    preprocess_sites(cfg, dirs)
    return dirs


def _sites(cfg, dirs: list[Path]):
    from simulation.generalisation import site_data

    return [site_data(cfg, d) for d in dirs]


def _pretrain_job(seed: int, pretraining: str, dirs: list[Path], out: Path) -> str:
    """Centralized phase 1 of ``pretraining`` for seed ``seed``, saved to ``out``."""
    import torch

    from common.training.centralized import pretrain_translation

    torch.set_num_threads(1)
    variant = next(v for v in VARIANTS if v.pretraining == pretraining)
    cfg = variant_config(seed, variant)
    state, _ = pretrain_translation(_sites(cfg, dirs), cfg)
    np.savez(out, **{k: v.numpy() for k, v in state.items()})
    return pretraining


def _stage_job(seed: int, variant: Variant, dirs: list[Path], translation: Path | None) -> tuple[str, dict]:
    """Centralized phase 2 of ``variant`` from the saved phase-1 state; its hip scores (JSON)."""
    import torch

    from common.training.centralized import train_two_phase
    from simulation.generalisation import Scored, score_net

    torch.set_num_threads(1)
    evaluation = seed_config(seed)  # phase 2 on the evaluation hips, whatever phase 1 read
    cfg = variant_config(seed, variant).replace(
        data_root=evaluation.data_root, cache_dir=evaluation.cache_dir
    )
    sites = _sites(cfg, dirs)
    state = None
    if translation is not None:
        with np.load(translation) as saved:
            state = {k: torch.from_numpy(saved[k]) for k in saved.files}
    net, _ = train_two_phase(sites, cfg, translation_state=state)
    return variant.slug, Scored.join(score_net(net, s) for s in sites).to_json()


def run_centralized(seed: int, variants: list[Variant], dirs: list[Path], blind_dirs) -> dict[str, dict]:
    """Every centralized model of ``variants`` for seed ``seed`` (two single-thread processes)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    states = {v.pretraining for v in variants if v.pretraining}
    saved = {p: SCORES / f"centralized-seed{seed}-pretrain-{p}.npz" for p in states}
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_pretrain_job, seed, p, blind_dirs if p == "lesion-blind-ct" else dirs, saved[p])
            for p in states
            if not saved[p].is_file()
        ]
        for future in futures:
            print(f"seed {seed}: centralized pretraining {future.result()} done", flush=True)
        futures = [pool.submit(_stage_job, seed, v, dirs, saved.get(v.pretraining)) for v in variants]
        return dict(future.result() for future in futures)


def run_federated(seed: int, variant: Variant, dirs: list[Path], blind_dirs) -> dict:
    """The federated model of ``variant`` (both phases in the simulation runtime); its hip scores."""
    sites = blind_dirs if variant.pretraining == "lesion-blind-ct" else dirs
    return delivered_federated(variant_config(seed, variant), sites).to_json()


def summarise(scores: dict[str, dict], reps: int = 1000) -> dict[str, dict]:
    """Per variant: the pooled figures with patient-level intervals (``reps`` draws), minus the full model."""
    from simulation.generalisation import Scored

    scored = {slug: Scored.from_json(raw) for slug, raw in scores.items()}
    out = {}
    for slug, s in scored.items():
        summary = s.summary(reps)
        out[slug] = {
            "macro-auroc": summary["macro-auroc"],
            "ci95": summary["ci95"]["macro-auroc"],
            "balanced-accuracy": summary["balanced-accuracy"],
            "sensitivity": summary["sensitivity"],
            "adjacent-auroc": summary["adjacent-auroc"],
        }
        if slug != FULL.slug and FULL.slug in scored:
            out[slug]["full minus this"] = scored[FULL.slug].versus(s, reps)
    return out


def ct_share(seed_summary: dict) -> float | None:
    """Share of the pretraining gain lost when CT no longer shows the lesion:
    (full - lesion-blind) / (full - no pretraining); None without a positive gain."""
    gain = seed_summary.get("no-pretraining", {}).get("full minus this", {}).get("difference")
    blind = seed_summary.get("lesion-blind-ct", {}).get("full minus this", {}).get("difference")
    return None if gain is None or blind is None or gain <= 0 else blind / gain


def _cell(run: dict) -> str:
    return f"{run['macro-auroc']:.3f} ({run['ci95'][0]:.3f}-{run['ci95'][1]:.3f})"


def _difference(d: dict) -> str:
    from simulation.comparison import p_value

    return f"{d['difference'] * 100:+.1f} ({d['ci95'][0] * 100:+.1f} to {d['ci95'][1] * 100:+.1f}), {p_value(d['p'])}"


def table(results: dict, mode: str) -> str:
    """Per variant: each seed's AUROC and full-minus-this (points, paired), their mean, the paper's."""
    seeds = results["summaries"].get(mode, {})
    rows = []
    for v in VARIANTS:
        runs = {seed: runs[v.slug] for seed, runs in seeds.items() if v.slug in runs}
        if not runs:
            continue
        aurocs = mean_sd([r["macro-auroc"] for r in runs.values()])
        gaps = [r["full minus this"] for r in runs.values() if "full minus this" in r]
        gap = mean_sd([g["difference"] * 100 for g in gaps]) if gaps else None
        rows.append(
            [
                v.name,
                "; ".join(f"{seed}: {_cell(r)}" for seed, r in runs.items()),
                f"{aurocs[0]:.3f} +- {aurocs[1]:.3f} (n = {len(runs)})",
                "; ".join(
                    f"{seed}: {_difference(r['full minus this'])}"
                    for seed, r in runs.items()
                    if "full minus this" in r
                )
                or "-",
                "-" if gap is None else f"{gap[0]:+.1f} +- {gap[1]:.1f} (n = {len(gaps)})",
                "-" if v.paper is None else f"{v.paper:+.1f}",
                " / ".join(f"{x:.2f}" for x in np.mean([r["sensitivity"] for r in runs.values()], axis=0)),
            ]
        )
    header = [
        "model",
        "macro AUROC (95% CI), per training seed",
        "mean +- SD",
        "full minus this, points (paired 95% CI, p), per seed",
        "mean +- SD, points",
        "paper, points",
        "mean sensitivity I / II / III / IV",
    ]
    return markdown(header, rows)


def control_table(results: dict) -> str:
    """Per mode and seed: the pretraining gain, what the lesion-blind CT and denoising keep of it."""
    rows = []
    for mode, seeds in results["summaries"].items():
        for seed, runs in seeds.items():
            gain = runs.get("no-pretraining", {}).get("full minus this")
            blind = runs.get("lesion-blind-ct", {}).get("full minus this")
            denoise = runs.get("mr-denoise", {}).get("full minus this")
            share = ct_share(runs)
            rows.append(
                [
                    mode,
                    seed,
                    "-" if gain is None else _difference(gain),
                    "-" if blind is None else _difference(blind),
                    "-" if denoise is None else _difference(denoise),
                    "-" if share is None else f"{share:.2f}",
                ]
            )
    header = [
        "mode",
        "training seed",
        "full minus no pretraining (the gain), points",
        "full minus lesion-blind CT, points",
        "full minus MR denoising, points",
        "share of the gain that needs CT to show the lesion",
    ]
    return markdown(header, rows)


def plot(results: dict, path: Path) -> None:
    """Full minus each variant (points, paired 95% CI) per mode and seed, beside the paper's gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = VARIANTS[1:]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for m, (mode, seeds) in enumerate(results["summaries"].items()):
        for j, runs in enumerate(seeds.values()):
            for i, v in enumerate(others):
                d = runs.get(v.slug, {}).get("full minus this")
                if d is None:
                    continue
                x = i + (m - 0.5) * 0.4 + (j - 1) * 0.08
                value, (low, high) = d["difference"] * 100, (c * 100 for c in d["ci95"])
                ax.errorbar(x, value, yerr=[[value - low], [high - value]], fmt="o" if m == 0 else "s",
                            color=f"C{m}", capsize=2, label=mode if (i, j) == (0, 0) else None)  # fmt: skip
    for i, v in enumerate(others):
        if v.paper is not None:
            ax.plot([i - 0.35, i + 0.35], [v.paper, v.paper], "k--", lw=1, label="paper" if i == 0 else None)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(others)), [v.name for v in others], fontsize=8)
    ax.set(
        ylabel="full model minus this, AUROC points (95% CI)",
        title="Ablation and pretraining control, evaluation federation",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scores_path(mode: str, seed: int, variant: Variant) -> Path:
    return SCORES / f"{mode}-seed{seed}-{variant.slug}.json"  # hip scores: a cut run continues


def run_seed(mode: str, seed: int, dirs: list[Path]) -> dict[str, dict]:
    """Every variant's hip scores in ``mode`` for ``seed`` (those already scored are read back)."""
    missing = [v for v in VARIANTS if not _scores_path(mode, seed, v).is_file()]
    blind_dirs = (
        lesion_blind_federation(dirs) if any(v.pretraining == "lesion-blind-ct" for v in missing) else []
    )
    if mode == "centralized" and missing:
        for slug, scores in run_centralized(seed, missing, dirs, blind_dirs).items():
            variant = next(v for v in VARIANTS if v.slug == slug)
            write_json(_scores_path(mode, seed, variant), scores)
    for variant in missing if mode == "federated" else []:
        write_json(_scores_path(mode, seed, variant), run_federated(seed, variant, dirs, blind_dirs))
        print(f"seed {seed}: federated {variant.name} done", flush=True)
    return {v.slug: json.loads(_scores_path(mode, seed, v).read_text()) for v in VARIANTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluation_ablation.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/evaluation_ablation.png"))
    args = parser.parse_args(argv)
    settings = budget(seed_config(0))
    dirs = evaluation_federation()
    SCORES.mkdir(parents=True, exist_ok=True)
    previous = earlier_results(args.out, settings)
    results = {
        "command": command("evaluation_ablation", argv),
        **machine(),
        "budget": settings,
        "variants": {
            v.slug: {"name": v.name, "fusion": v.fusion, "pretraining": v.pretraining, "paper": v.paper}
            for v in VARIANTS
        },  # fmt: skip
        "summaries": previous.get("summaries", {}),
        "seconds": previous.get("seconds", {}),
    }
    for seed in args.seeds:  # seed by seed, so that a cut run leaves whole seeds
        for mode in args.modes:
            t0, trained = time.time(), [v for v in VARIANTS if not _scores_path(mode, seed, v).is_file()]
            scores = run_seed(mode, seed, dirs)
            if trained:  # the wall time of the run that trained them (a continued run: its part)
                results["seconds"].setdefault(mode, {})[str(seed)] = round(time.time() - t0)
            seeds = {**results["summaries"].get(mode, {}), str(seed): summarise(scores)}
            results["summaries"][mode] = dict(sorted(seeds.items(), key=lambda item: int(item[0])))
            write_json(args.out, results)
    for mode in results["summaries"]:
        print(f"\n{mode}:\n{table(results, mode)}")
    print(f"\npretraining control:\n{control_table(results)}")
    plot(results, args.plot)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
