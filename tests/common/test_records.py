"""Flower records carry our numpy dicts unchanged: shapes (0-d included), dtypes and values."""

import numpy as np

from common.config import ModelConfig
from common.models.factory import build_staging
from common.records import from_record, to_record
from common.training.weights import get_local_state, set_shared_state


def test_round_trip_keeps_shapes_dtypes_and_values():
    arrays = {
        "scalar": np.array(7, dtype=np.int64),
        "half": np.arange(6, dtype=np.float16).reshape(2, 3),
        "strided": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],
    }
    back = from_record(to_record(arrays))
    assert set(back) == set(arrays)
    for key, value in arrays.items():
        assert back[key].shape == value.shape and back[key].dtype == value.dtype
        np.testing.assert_array_equal(back[key], value)


def test_fedbn_local_state_survives_the_client_state_record():
    # Site-local norm layers may travel through an ArrayRecord (Flower state, records); the
    # step counters are 0-d and must come back loadable.
    trained = build_staging(ModelConfig())
    local = get_local_state(trained)
    assert any(v.ndim == 0 for v in local.values())
    fresh = build_staging(ModelConfig())
    set_shared_state(fresh, from_record(to_record(local)))
    for key, value in local.items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value)
