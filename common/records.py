"""Conversions between Flower records and plain numpy dicts (the only Flower-typed helpers)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A numpy dict as a Flower ArrayRecord (C-ordered copies where needed, 0-d arrays kept 0-d)."""
    # np.asarray(order="C"), not np.ascontiguousarray: that one turns a 0-d array (a BatchNorm
    # step counter kept at the site under FedBN) into shape (1,).
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A Flower ArrayRecord as a numpy dict (names and dtypes as sent)."""
    return {k: v.numpy() for k, v in record.items()}
