"""Centralized and local-only baselines: the same models and loops, on pooled or single-site data.

``onfh train SITE_DIR [SITE_DIR ...]`` trains on the pooled sites (the upper bound);
``--local`` trains one model per site on that site alone. Both run phase 1 (MR-to-CT
pretraining) then phase 2 (staging) with the compute budget of the federated run
(rounds x local epochs), and score every site's held-out test hips.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from common.datasets import HipDataset, PairDataset
from common.device import seed_everything
from common.metrics import staging_metrics
from common.models.factory import build_staging, build_translation
from common.models.staging import StagingNet
from common.models.transfer import load_pretrained_encoder
from common.run_config import RunConfig
from common.site_data import SiteData, load_site
from common.training import predict_staging, train_staging, train_translation


def train_two_phase(sites: list[SiteData], cfg: RunConfig, progress=None) -> tuple[StagingNet, dict]:
    """Pretrain (if configured) and fine-tune one staging network on the union of ``sites``."""
    seed_everything(cfg.seed)
    say = progress or (lambda _msg: None)
    translation, staging = build_translation(cfg.model), build_staging(cfg.model)
    info: dict = {"sites": [s.name for s in sites]}
    started = time.time()
    if cfg.pretrained and cfg.pretrain_rounds > 0:
        mr = np.concatenate([s.pair_set("train", "val")[0] for s in sites])
        ct = np.concatenate([s.pair_set("train", "val")[1] for s in sites])
        sites_with_pairs = sum(len(s.pair_set("train", "val")[0]) > 0 for s in sites)
        budget = cfg.pretrain_max_pairs * max(sites_with_pairs, 1)
        if len(mr) > budget:  # the same number of pairs per epoch as the federation sees per round
            pick = np.sort(np.random.default_rng(cfg.seed).choice(len(mr), budget, replace=False))
            mr, ct = mr[pick], ct[pick]
        if len(mr):
            tcfg = cfg.pretrain_training(cfg.seed)
            tcfg.epochs = cfg.pretrain_rounds * cfg.pretrain_epochs
            say(
                f"pretraining MR-to-CT on {len(mr)} slice pairs from {sites_with_pairs} site(s), {tcfg.epochs} epochs"
            )
            info["pretrain"] = _plain(
                train_translation(translation, PairDataset(mr, ct, augment=cfg.augment), tcfg)
            )
            load_pretrained_encoder(staging, translation.state_dict())
        else:
            say("no MR-CT pairs: staging starts from random weights")
    images, available, stages = (
        np.concatenate(x) for x in zip(*(s.staging_set("train") for s in sites), strict=True)
    )
    scfg = cfg.stage_training(cfg.seed)
    scfg.epochs = cfg.stage_rounds * cfg.stage_epochs
    say(f"training staging on {len(stages)} labelled hips, {scfg.epochs} epochs")
    info["stage"] = _plain(
        train_staging(staging, HipDataset(images, available, stages, augment=cfg.augment), scfg)
    )
    info["seconds"] = time.time() - started
    return staging, info


def evaluate_sites(net: StagingNet, sites: list[SiteData], split: str = "test", n_boot: int = 200) -> dict:
    """Per-site and pooled staging metrics on each site's ``split`` hips."""
    out: dict = {"sites": {}}
    all_probs, all_labels = [], []
    for site in sites:
        images, available, stages = site.staging_set(split)
        if len(stages) == 0:
            continue
        probs, labels = predict_staging(net, HipDataset(images, available, stages))
        out["sites"][site.name] = staging_metrics(probs, labels, n_boot=n_boot)
        all_probs.append(probs)
        all_labels.append(labels)
    if all_probs:
        out["pooled"] = staging_metrics(np.concatenate(all_probs), np.concatenate(all_labels), n_boot=n_boot)
    return out


def _plain(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, list))}


def save_model(net: StagingNet, cfg: RunConfig, out_dir: Path, results: dict) -> None:
    """The layout ``onfh predict`` reads: run_config.json, final_model.npz, results.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    np.savez(out_dir / "final_model.npz", **{k: v.cpu().numpy() for k, v in net.state_dict().items()})
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onfh train", description=__doc__.split("\n\n")[0])
    parser.add_argument("sites", nargs="+", type=Path, help="site folders (DICOM + labels.csv)")
    parser.add_argument("--local", action="store_true", help="one model per site, trained on that site alone")
    parser.add_argument(
        "--config", type=Path, help="TOML preset of run-config keys (e.g. presets/quick.toml)"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/onfh"))
    parser.add_argument("--out", type=Path, default=Path("outputs/centralized"))
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config)
        sites = [
            load_site(
                d, args.cache_dir / d.name, cfg.preprocess, split_seed=cfg.seed, name=d.name, progress=print
            )
            for d in args.sites
        ]
    except ValueError as exc:
        print(f"onfh train: {exc}", file=sys.stderr)
        return 2
    groups = [[s] for s in sites] if args.local else [sites]
    summary = {}
    for group in groups:
        name = group[0].name if args.local else "pooled"
        net, info = train_two_phase(group, cfg, progress=print)
        results = {"train": info, "test": evaluate_sites(net, group)}
        save_model(net, cfg, args.out / name, results)
        pooled = results["test"].get("pooled", {})
        summary[name] = pooled.get("macro_auroc")
        print(
            f"{name}: test macro AUROC {pooled.get('macro_auroc', float('nan')):.3f} "
            f"(95% CI {pooled.get('macro_auroc_ci')}) on {pooled.get('n_samples', 0)} hips -> {args.out / name}"
        )
    return 0


def load_run_config(path: Path | None, **overrides) -> RunConfig:
    """Defaults, then a TOML preset (flat run-config keys), then keyword overrides."""
    raw: dict = {}
    if path is not None:
        import tomllib

        if not path.is_file():
            raise ValueError(f"config preset {path} not found; see presets/ for examples")
        raw = tomllib.loads(path.read_text())
    raw.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return RunConfig.from_dict(raw)


if __name__ == "__main__":
    sys.exit(main())
