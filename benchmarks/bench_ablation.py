"""Ablation of the paper's two ingredients (pretraining, attention fusion), trained centrally.

Four models per seed, all with ``train_two_phase`` on the pooled training hips of every site
and the compute budget of the run config (default ``presets/default.toml``: pretraining
2 rounds x 1 epoch, staging 8 rounds x 2 epochs; epochs = rounds x epochs):

    plain VGG          fusion=plain,     pretrained=false
    + pretraining      fusion=plain,     pretrained=true
    + attention fusion fusion=attention, pretrained=false
    full model         fusion=attention, pretrained=true

Score: test macro AUROC pooled over all sites' held-out hips. The patient split is fixed
(``--split-seed``); ``--seeds`` changes the initialisation, shuffling and augmentation. Phase 1
runs once per seed and is shared by the two pretrained models.

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_ablation --seeds 0 1 2
    .venv/bin/python -m benchmarks.bench_ablation --quick      # smoke: 1 epoch each, seed 0

Prints one line per model, the table, the headline last, and writes JSON (default
``benchmarks/results/ablation.json``, rewritten after every model so a cut run keeps its part).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from common.centralized import evaluate_sites, load_run_config, pretrain_translation, train_two_phase
from common.site_data import load_site

# (name, fusion, pretrained); the paper's gain is the full model's AUROC minus this row's, in points.
CONFIGS: tuple[tuple[str, str, bool], ...] = (
    ("plain VGG", "plain", False),
    ("+ pretraining", "plain", True),
    ("+ attention fusion", "attention", False),
    ("full model", "attention", True),
)
PAPER_GAIN_OF_FULL = {  # Kim et al. 2023: full model over each ablated model, AUROC points
    "plain VGG": 6.8,
    "+ pretraining": 2.6,  # = the "without attention fusion" ablation
    "+ attention fusion": 4.7,  # = the "without self-supervised learning" ablation
    "full model": 0.0,
}


def _summary(values: list[float]) -> dict:
    finite = [v for v in values if np.isfinite(v)]
    return {
        "per_seed": values,
        "mean": float(np.mean(finite)) if finite else float("nan"),
        "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
    }


def table(results: dict) -> str:
    """Markdown table: AUROC mean +- SD over seeds, the full model's gain over each row, the paper's."""
    full = results["summary"].get("full model", {}).get("mean", float("nan"))
    lines = [
        "| model | fusion | pretrained | test macro AUROC, mean +- SD (per seed) "
        "| full model minus this row (points) | paper: full minus this row |",
        "|---|---|---|---|---|---|",
    ]
    for name, fusion, pretrained in CONFIGS:
        row = results["summary"].get(name)
        if row is None:
            continue
        seeds = ", ".join(f"{v:.3f}" for v in row["per_seed"])
        gain = 100 * (full - row["mean"])
        paper = PAPER_GAIN_OF_FULL[name]
        lines.append(
            f"| {name} | {fusion} | {str(pretrained).lower()} | {row['mean']:.3f} +- {row['sd']:.3f} ({seeds}) "
            f"| {gain:+.1f} | {'+' if paper else ''}{paper:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/fed_default"), help="federation folder")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cache_default"), help="cache root (site-NN)")
    parser.add_argument("--config", type=Path, default=Path("presets/default.toml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--split-seed", type=int, default=0, help="patient split (fixed across seeds)")
    parser.add_argument("--quick", action="store_true", help="smoke: 1 epoch per phase, 200 pairs per site")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ablation.json"))
    args = parser.parse_args(argv)

    overrides = {}
    if args.quick:
        overrides = dict(
            pretrain_rounds=1, pretrain_epochs=1, pretrain_max_pairs=200, stage_rounds=1, stage_epochs=1
        )
    base = load_run_config(args.config, **overrides)
    site_dirs = sorted(d for d in args.data.glob("site-*") if d.is_dir())
    if not site_dirs:
        print(f"no site-NN folders in {args.data}: pass --data with a federation from 'onfh synth'")
        return 2
    started = time.time()
    sites = [
        load_site(d, args.cache / d.name, base.preprocess, split_seed=args.split_seed, name=d.name)
        for d in site_dirs
    ]
    counts = {s.name: {sp: len(s.staging_set(sp)[2]) for sp in ("train", "val", "test")} for s in sites}
    print(f"{len(sites)} sites loaded in {time.time() - started:.0f} s; labelled hips: {counts}")
    results: dict = {
        "command": "python -m benchmarks.bench_ablation "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, no GPU",
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "data": str(args.data),
        "labelled_hips": counts,
        "budget": {
            "pretrain_epochs": base.pretrain_rounds * base.pretrain_epochs,
            "pretrain_max_pairs_per_site": base.pretrain_max_pairs,
            "stage_epochs": base.stage_rounds * base.stage_epochs,
            "model_preset": base.model_preset,
        },
        "runs": [],
        "summary": {},
    }
    for seed in args.seeds:
        cfg_seed = base.replace(seed=seed)
        t0 = time.time()
        translation_state, pretrain_info = pretrain_translation(sites, cfg_seed.replace(pretrained=True))
        pretrain_seconds = time.time() - t0
        print(
            f"seed {seed}: phase 1 in {pretrain_seconds:.0f} s, loss {pretrain_info.get('loss', float('nan')):.4f}"
        )
        for name, fusion, pretrained in CONFIGS:
            cfg = cfg_seed.replace(fusion=fusion, pretrained=pretrained)
            t0 = time.time()
            net, info = train_two_phase(sites, cfg, translation_state=translation_state)
            scores = evaluate_sites(net, sites, n_boot=1000)
            pooled = scores["pooled"]
            run = {
                "seed": seed,
                "model": name,
                "fusion": fusion,
                "pretrained": pretrained,
                "test_macro_auroc": pooled["macro_auroc"],
                "test_macro_auroc_ci": pooled["macro_auroc_ci"],
                "test_per_stage_auroc": pooled["per_stage_auroc"],
                "test_accuracy": pooled["accuracy"],
                "test_balanced_accuracy": pooled["balanced_accuracy"],
                "test_qwk": pooled["qwk"],
                "test_hips": pooled["n_samples"],
                "per_site_auroc": {k: v["macro_auroc"] for k, v in scores["sites"].items()},
                "train_loss_last_epoch": info["stage"]["loss"],
                "train_accuracy_last_epoch": info["stage"]["accuracy"],
                "stage_seconds": time.time() - t0,
                "pretrain_seconds": pretrain_seconds if pretrained else 0.0,
                "pretrain_loss": pretrain_info.get("loss") if pretrained else None,
            }
            results["runs"].append(run)
            print(
                f"seed {seed} {name:<19} AUROC {run['test_macro_auroc']:.3f} "
                f"(CI {run['test_macro_auroc_ci'][0]:.3f}-{run['test_macro_auroc_ci'][1]:.3f}, "
                f"{run['test_hips']} hips) train loss {run['train_loss_last_epoch']:.3f} "
                f"in {run['stage_seconds']:.0f} s",
                flush=True,
            )
            results["summary"] = {
                n: _summary([r["test_macro_auroc"] for r in results["runs"] if r["model"] == n])
                for n, _, _ in CONFIGS
                if any(r["model"] == n for r in results["runs"])
            }
            results["seconds"] = time.time() - started
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    summary = results["summary"]
    full, plain = summary["full model"]["mean"], summary["plain VGG"]["mean"]
    print(
        f"\nheadline: full model {full:.3f} vs plain VGG {plain:.3f} test macro AUROC "
        f"({100 * (full - plain):+.1f} points; paper +6.8) over seeds {args.seeds}, "
        f"{time.time() - started:.0f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
