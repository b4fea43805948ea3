"""The rules of the privacy run-config keys, checked without torch: ``dp-*`` (site-level
differential privacy) and ``secure-aggregation``, ``secagg-clip-range``.

Split from :mod:`common.config` by concept (and size). The mechanisms live in ``server/privacy.py``
and ``common/secagg.py``; docs/privacy.md says what each protects.
"""

from __future__ import annotations

import math
from typing import Any

DP_PHASES: tuple[str, ...] = ("both", "pretrain", "stage")
# Strategies whose aggregate is a mean, so one site's clipped update moves it by at most clip / n:
# the noise is calibrated to that. Medians, trimmed means and Krum select among the updates (and
# the FedOpt family steps a server optimiser whose noise would have to come first): refused.
DP_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")
# Strategies that need only the weighted mean of the updates: the ones secure aggregation serves
# (the server sees only the sum; a server optimiser steps from the mean; a median or Krum needs each update).
SECURE_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


def secure_aggregation_problem(cfg: Any) -> tuple[str, Any, str] | None:
    """``(key, value, fix)`` of an invalid secure-aggregation setting of a RunConfig, else None."""
    if cfg.secure_aggregation and cfg.strategy not in SECURE_STRATEGIES:
        fix = (
            f"the server sees only the sum of the updates, which strategy '{cfg.strategy}' cannot use; use "
            f"strategy {' or '.join(repr(s) for s in SECURE_STRATEGIES)}, or secure-aggregation = false"
        )
        return "secure-aggregation", True, fix
    if not (math.isfinite(cfg.secagg_clip_range) and cfg.secagg_clip_range > 0):
        return "secagg-clip-range", cfg.secagg_clip_range, "use a positive bound, e.g. 4.0"
    return None


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


def check_privacy_settings(cfg: Any) -> None:
    """Raise ValueError naming the key, its value and the fix, as RunConfig does for every key."""
    problem = secure_aggregation_problem(cfg) or dp_problem(cfg)
    if problem is not None:
        key, value, fix = problem
        raise ValueError(f"run config '{key}' = {value!r} is invalid: {fix}")
