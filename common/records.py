"""Conversions between Flower records and plain numpy dicts (the only Flower-typed helpers)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    # np.asarray(order="C"), not np.ascontiguousarray: that one turns a 0-d array (a BatchNorm
    # step counter kept at the site under FedBN) into shape (1,).
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}
