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
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from common.config import RunConfig, load_run_config
from common.files import json_safe
from common.models.factory import build_staging, build_translation
from common.models.staging import StagingNet
from common.models.transfer import load_pretrained_encoder
from common.sitedata.load import SiteData, load_site
from common.training.datasets import HipDataset, pretraining_pairs
from common.training.device import seed_everything
from common.training.loops import predict_staging, train_staging, train_translation
from common.training.metrics import staging_metrics

Progress = Callable[[str], None]


def pretrain_translation(
    sites: list[SiteData], cfg: RunConfig, progress: Progress | None = None
) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """Phase 1 on the pooled MR-CT slice pairs of the train and val patients of ``sites``.

    The budget matches the federation's: at most ``pretrain-max-pairs`` pairs per site with
    pairs, for ``pretrain-rounds x pretrain-epochs`` epochs.

    Returns:
        The trained ``TranslationUNet`` state dict (None when no site has pairs) and the
        training stats (``train_translation``'s dict without per-step lists; empty when None).
    """
    say = progress or (lambda _msg: None)
    pair_sets = [s.pair_set("train", "val") for s in sites]
    sites_with_pairs = sum(len(mr) > 0 for mr, _ in pair_sets)
    if sites_with_pairs == 0:
        say("no MR-CT pairs: staging starts from random weights")
        return None, {}
    mr = np.concatenate([mr for mr, _ in pair_sets])
    ct = np.concatenate([ct for _, ct in pair_sets])
    budget = cfg.pretrain_max_pairs * sites_with_pairs
    if len(mr) > budget:  # the same number of pairs per epoch as the federation sees per round
        pick = np.sort(np.random.default_rng(cfg.seed).choice(len(mr), budget, replace=False))
        mr, ct = mr[pick], ct[pick]
    tcfg = cfg.pretrain_training(cfg.seed)
    tcfg.epochs = cfg.pretrain_rounds * cfg.pretrain_epochs
    say(
        f"pretraining ({cfg.pretrain_target}) on {len(mr)} slice pairs from {sites_with_pairs} site(s), "
        f"{tcfg.epochs} epochs"
    )
    seed_everything(cfg.seed)
    translation = build_translation(cfg.model)
    pairs = pretraining_pairs(mr, ct, cfg.pretrain_target, cfg.seed)
    stats = train_translation(translation, pairs, tcfg, progress=say)
    state = {k: v.detach().cpu() for k, v in translation.state_dict().items()}
    return state, _plain(stats)


def train_two_phase(
    sites: list[SiteData],
    cfg: RunConfig,
    progress: Progress | None = None,
    translation_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[StagingNet, dict]:
    """Pretrain (if ``cfg.pretrained``) and fine-tune one staging network on the union of ``sites``.

    Phase 2 trains on the labelled hips of the sites' ``train`` split for ``stage-rounds x
    stage-epochs`` epochs (the federation's compute budget); the staging network is initialised
    from seed ``cfg.seed`` whether or not phase 1 ran, so ablations differ only by the encoder.

    Args:
        sites: the sites to pool (one site for a local-only baseline).
        cfg: run settings (model, budget, learning rates, seed).
        progress: optional callback, one line per step / epoch.
        translation_state: a phase-1 result (``pretrain_translation``) to reuse instead of
            training it again (ablations share one per seed); ignored unless ``cfg.pretrained``.

    Returns:
        The trained ``StagingNet`` (eval mode, on its training device) and an info dict:
        ``sites``, ``pretrain`` (phase-1 stats, when it ran here), ``pretrained_encoder``
        (bool), ``stage`` (phase-2 stats), ``seconds``.

    Raises:
        ValueError: no site has a labelled training hip (the message names the sites).
    """
    say = progress or (lambda _msg: None)
    info: dict = {"sites": [s.name for s in sites], "pretrained_encoder": False}
    started = time.time()
    images, available, stages = (
        np.concatenate(x) for x in zip(*(s.staging_set("train") for s in sites), strict=True)
    )
    if len(stages) == 0:
        names = ", ".join(s.name for s in sites)
        raise ValueError(
            f"no labelled training hip in {names}: fill arco_stage (1-4) in labels.csv; "
            "'onfh check SITE_DIR' shows what was found"
        )
    if cfg.stage_rounds < 1:
        raise ValueError(
            f"run config 'stage-rounds' = {cfg.stage_rounds}: training a staging model needs >= 1"
        )
    if cfg.pretrained and cfg.pretrain_rounds > 0 and translation_state is None:
        translation_state, info["pretrain"] = pretrain_translation(sites, cfg, say)
    seed_everything(cfg.seed)
    staging = build_staging(cfg.model)
    if cfg.pretrained and translation_state is not None:
        load_pretrained_encoder(staging, translation_state)
        info["pretrained_encoder"] = True
    scfg = cfg.stage_training(cfg.seed)
    scfg.epochs = cfg.stage_rounds * cfg.stage_epochs
    val_images, val_available, val_stages = (
        np.concatenate(x) for x in zip(*(s.staging_set("val") for s in sites), strict=True)
    )
    val_ds = None
    if cfg.select_on_val and len(val_stages):
        # Keep the epoch with the best validation AUROC, as the federation keeps its best round.
        val_ds, scfg.select_on_val = HipDataset(val_images, val_available, val_stages), True
    say(f"training staging ({cfg.fusion} fusion) on {len(stages)} labelled hips, {scfg.epochs} epochs")
    info["stage"] = _plain(
        train_staging(
            staging,
            HipDataset(images, available, stages),
            scfg,
            val_ds=val_ds,
            progress=say,
        )
    )
    info["seconds"] = time.time() - started
    return staging.eval(), info


def evaluate_sites(net: StagingNet, sites: list[SiteData], split: str = "test", n_boot: int = 200) -> dict:
    """Per-site and pooled staging metrics on each site's labelled ``split`` hips.

    Returns:
        ``{"sites": {name: staging_metrics}, "pooled": staging_metrics}`` (``common.training.metrics``);
        a site without labelled hips in ``split`` is left out, and ``"pooled"`` is absent when
        no site has any. A macro AUROC is NaN where fewer than two stages are present.
    """
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
    """Write the run folder ``onfh predict --model`` reads.

    Layout: ``out_dir/run_config.json`` (kebab-case run config), ``final_model.npz`` (the
    staging network's state dict, one array per key) and ``results.json`` (``results`` as
    strict JSON: undefined metrics are ``null``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    np.savez(out_dir / "final_model.npz", **{k: v.cpu().numpy() for k, v in net.state_dict().items()})
    (out_dir / "results.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False))


def _auroc_line(metrics: dict) -> str:
    auroc, (low, high) = metrics.get("macro_auroc", float("nan")), metrics.get("macro_auroc_ci", (None, None))
    n = metrics.get("n_samples", 0)
    if not np.isfinite(auroc):
        return f"test macro AUROC undefined ({n} labelled test hips, fewer than two stages among them)"
    ci = f", 95% CI {low:.3f}-{high:.3f}" if low is not None and np.isfinite(low) else ""
    return f"test macro AUROC {auroc:.3f}{ci} on {n} hips"


def main(argv: list[str] | None = None) -> int:
    """``onfh train``: returns 0 when every requested model was trained, 2 on a user error."""
    parser = argparse.ArgumentParser(prog="onfh train", description=__doc__.split("\n\n")[0])
    parser.add_argument("sites", nargs="+", type=Path, help="site folders (DICOM + labels.csv)")
    parser.add_argument("--local", action="store_true", help="one model per site, trained on that site alone")
    parser.add_argument("--config", type=Path, help="TOML preset of run-config keys (e.g. presets/tiny.toml)")
    parser.add_argument(
        "--seed", type=int, help="overrides the run config's seed (initialisation, shuffling, augmentation)"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/onfh"), help="one sub-folder per site")
    parser.add_argument("--workers", type=int, default=1, help="processes for preprocessing (first load)")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/centralized"), help="writes OUT/pooled or OUT/SITE_NAME"
    )
    args = parser.parse_args(argv)
    names = [d.name for d in args.sites]
    if len(set(names)) != len(names):
        print(f"onfh train: site folders must have distinct names, got {names}", file=sys.stderr)
        return 2
    try:
        cfg = load_run_config(args.config, **({} if args.seed is None else {"seed": args.seed}))
        sites = [
            load_site(
                d,
                args.cache_dir / d.name,
                cfg.preprocess,
                split_seed=cfg.split_seed,
                fractions=cfg.split,
                name=d.name,
                workers=max(args.workers, 1),
                progress=print,
            )
            for d in args.sites
        ]
    except (ValueError, OSError) as exc:
        print(f"onfh train: {exc}", file=sys.stderr)
        return 2
    for site in sites:
        counts = ", ".join(f"{len(site.staging_set(split)[2])} {split}" for split in ("train", "val", "test"))
        print(f"{site.name}: {len(site.sides)} hips ({counts} labelled), {len(site.pairs_mr)} MR-CT pairs")
    groups = [[s] for s in sites] if args.local else [sites]
    failed = []
    for group in groups:
        name = group[0].name if args.local else "pooled"
        try:
            net, info = train_two_phase(group, cfg, progress=lambda msg, n=name: print(f"{n}: {msg}"))
        except ValueError as exc:
            print(f"onfh train: {name}: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        results = {"train": info, "test": evaluate_sites(net, group)}
        save_model(net, cfg, args.out / name, results)
        print(f"{name}: {_auroc_line(results['test'].get('pooled', {}))} -> {args.out / name}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
