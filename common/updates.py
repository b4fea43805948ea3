"""A site's weight update and its L2 clipping, shared by the server's DP (:mod:`server.privacy`) and
the site's clipping under secure aggregation (:mod:`client.client_app`), where the server cannot clip."""

from __future__ import annotations

import math

import numpy as np


def update_of(arrays: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A site's update over the shared arrays: its weights minus the global weights sent (float64).

    Raises:
        ValueError: an array is not floating point (its noise could not be represented).
    """
    update = {}
    for name, base in sent.items():
        if not np.issubdtype(base.dtype, np.floating):
            raise ValueError(f"differential privacy needs float tensors; {name!r} is {base.dtype}")
        update[name] = arrays[name].astype(np.float64) - base.astype(np.float64)
    return update


def l2_norm(arrays: dict[str, np.ndarray]) -> float:
    """L2 norm of all arrays taken as one vector."""
    return float(math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in arrays.values())))


def clip_update(update: dict[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``(update scaled to L2 norm <= clip_norm, its norm before)``: flat clipping over all arrays."""
    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}, norm
