"""The rules of the ``dp-*`` run-config keys (site-level differential privacy), checked without torch.

Split from :mod:`common.config` by concept (and size). The mechanism and the accountant live in
``server/privacy.py``; docs/federation.md "Differential privacy" says what is protected.
"""

from __future__ import annotations

import math
from typing import Any

DP_PHASES: tuple[str, ...] = ("both", "pretrain", "stage")
# Strategies whose aggregate is a mean, so one site's clipped update moves it by at most clip / n:
# the noise is calibrated to that. Medians, trimmed means and Krum select among the updates (and
# the FedOpt family steps a server optimiser whose noise would have to come first): refused.
DP_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")


def dp_problem(cfg: Any) -> tuple[str, Any, str] | None:
    """``(key, value, fix)`` of the first invalid ``dp-*`` setting of a RunConfig, else None."""
    z, clip, delta = cfg.dp_noise_multiplier, cfg.dp_clip_norm, cfg.dp_delta
    if not (math.isfinite(z) and z >= 0):
        return "dp-noise-multiplier", z, "use 0 (no differential privacy) or a positive noise multiplier"
    if not (math.isfinite(clip) and clip > 0):
        return (
            "dp-clip-norm",
            clip,
            "use a positive L2 norm (about the median update norm of a run without DP)",
        )
    if not 0 < delta < 1:
        return "dp-delta", delta, "use a probability in (0, 1), well below 1 / number of sites, e.g. 1e-5"
    if cfg.dp_phases not in DP_PHASES:
        return "dp-phases", cfg.dp_phases, f"use one of {', '.join(DP_PHASES)}"
    if z > 0 and cfg.strategy not in DP_STRATEGIES:
        fix = (
            f"differential privacy (dp-noise-multiplier = {z:g}) works with strategy "
            f"{' or '.join(DP_STRATEGIES)} only: a robust rule or a server optimiser does not average "
            "the clipped updates the noise is calibrated to; use strategy = 'fedavg', or dp-noise-multiplier = 0"
        )
        return "strategy", cfg.strategy, fix
    if z > 0 and cfg.norm == "batch" and not cfg.fedbn:
        fix = (
            "with differential privacy the batch-norm running variances would travel and be noised "
            "(below zero); set fedbn = true (normalisation layers stay at the sites) or norm = 'group'"
        )
        return "norm", cfg.norm, fix
    return None


def check_dp_settings(cfg: Any) -> None:
    """Raise ValueError naming the key, its value and the fix, as RunConfig does for every key."""
    problem = dp_problem(cfg)
    if problem is not None:
        key, value, fix = problem
        raise ValueError(f"run config '{key}' = {value!r} is invalid: {fix}")
