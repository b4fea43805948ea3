"""The centralized and local-only baselines of the main job, trained side by side.

Each baseline is one job (pooled sites, or one site alone) in its own process with one torch
thread: small convolutions gain little from a second thread, so two jobs at once use two cores
better than one job with two threads.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from common.config import RunConfig
from common.progress import progress_bar


def _job(name: str, site_dirs: list[Path], cfg: RunConfig) -> tuple[str, dict, float]:
    import torch

    from common.sitedata.load import load_site
    from common.training.centralized import evaluate_sites, train_two_phase
    from simulation.generalisation import Scored, score_net

    torch.set_num_threads(1)
    started = time.time()
    sites = [
        load_site(
            d,
            Path(cfg.cache_dir) / d.name,
            cfg.preprocess,
            split_seed=cfg.split_seed,
            fractions=cfg.split,
            name=d.name,
        )
        for d in site_dirs
    ]
    net, _ = train_two_phase(sites, cfg)
    result = evaluate_sites(net, sites)
    # Hip scores with their patients: pooled AUROCs and intervals that resample patients.
    parts = [score_net(net, site) for site in sites if len(site.staging_set("test")[2])]
    if parts:
        result["scores"] = Scored.join(parts).to_json()
    return name, result, time.time() - started


def run_baselines(cfg: RunConfig, site_dirs: list[Path], workers: int = 2) -> tuple[dict, dict[str, dict]]:
    """Centralized (all sites pooled) and local-only (each site alone), on the same splits.

    Returns ``(central, local)``: ``evaluate_sites`` results; ``local`` per site name.
    """
    jobs = {"centralized": site_dirs, **{d.name: [d] for d in site_dirs}}
    central: dict = {}
    local: dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")
    with (
        ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool,
        progress_bar("baselines", len(jobs)) as bar,
    ):
        futures = [pool.submit(_job, name, dirs, cfg) for name, dirs in jobs.items()]
        for future in as_completed(futures):
            bar.advance()
            name, result, seconds = future.result()
            auroc = result.get("pooled", {}).get("macro_auroc", float("nan"))
            label = "centralized (pooled sites)" if name == "centralized" else f"local-only {name}"
            print(f"      {label}: test macro AUROC {auroc:.3f} ({seconds:.0f}s)", flush=True)
            if name == "centralized":
                central = result
            else:
                local[name] = result
    return central, local


def pooled_local_scores(local: dict[str, dict]):
    """The local-only models' hip scores pooled: each site's test hips scored by its own model."""
    from simulation.generalisation import Scored

    # Site order, as the other columns, so that paired comparisons line the same hips up.
    parts = [Scored.from_json(local[name]["scores"]) for name in sorted(local) if "scores" in local[name]]
    return Scored.join(parts) if parts else None


def pooled_local_auroc(local: dict[str, dict]) -> float | None:
    """Pooled AUROC of the local-only models: each site's test hips scored by its own model."""
    from common.training.metrics import macro_auroc

    pooled = pooled_local_scores(local)
    return macro_auroc(pooled.probs, pooled.labels) if pooled is not None else None
