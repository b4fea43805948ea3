"""Checks on a site's model update before it may enter the aggregate."""

from __future__ import annotations

import numpy as np


def update_problem(
    reference: dict[str, tuple[tuple[int, ...], str]],
    update: dict[str, np.ndarray],
    allowed_dtypes: tuple[str, ...] = ("float32", "float16"),
) -> str | None:
    """Why ``update`` may not be aggregated, or None when it is sound.

    Args:
        reference: the global model's arrays as ``name -> (shape, dtype)``.
        update: the site's arrays.
        allowed_dtypes: float dtypes accepted on the wire for float tensors.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing:
        return f"missing {len(missing)} arrays (e.g. {missing[0]})"
    if extra:
        return f"{len(extra)} unexpected arrays (e.g. {extra[0]})"
    for name, (shape, dtype) in reference.items():
        array = update[name]
        if tuple(array.shape) != tuple(shape):
            return f"array {name} has shape {tuple(array.shape)}, expected {tuple(shape)}"
        expected = (dtype,) + (allowed_dtypes if dtype in allowed_dtypes else ())
        if str(array.dtype) not in expected:
            return f"array {name} has dtype {array.dtype}, expected {dtype}"
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            return f"array {name} holds {bad} NaN/Inf values"
    return None
