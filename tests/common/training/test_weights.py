"""What travels to the server: everything but BN step counters; FedBN keeps norm layers home."""

import numpy as np
import pytest

from common.config import ModelConfig
from common.models.factory import build_staging
from common.training.weights import get_local_state, get_shared_state, local_norm_keys, set_shared_state


@pytest.fixture(scope="module")
def net():
    return build_staging(ModelConfig())


def test_shared_state_skips_step_counters(net):
    shared = get_shared_state(net, fedbn=False)
    assert not any(k.endswith("num_batches_tracked") for k in shared)
    assert all(v.dtype == np.float32 for v in shared.values())


def test_fedbn_keeps_normalisation_layers_local(net):
    shared = get_shared_state(net, fedbn=True)
    local = get_local_state(net)
    norm = local_norm_keys(net)
    assert norm and not (set(shared) & norm)
    assert set(local) == norm
    assert any("running_mean" in k for k in local)


def test_float16_wire_and_round_trip(net):
    shared = get_shared_state(net, fedbn=False, dtype="float16")
    assert all(v.dtype == np.float16 for v in shared.values())
    other = build_staging(ModelConfig())
    set_shared_state(other, shared)
    key = next(iter(shared))
    np.testing.assert_allclose(other.state_dict()[key].numpy(), shared[key].astype(np.float32))


def test_mismatch_is_named(net):
    with pytest.raises(ValueError, match="unknown tensors"):
        set_shared_state(net, {"nope": np.zeros(1, np.float32)})
    key = next(iter(get_shared_state(net, False)))
    with pytest.raises(ValueError, match=f"tensor {key} has shape"):
        set_shared_state(net, {key: np.zeros((1, 1, 1, 1, 1), np.float32)})


def test_the_wire_arrays_are_c_ordered_whatever_the_tensor_layout(net):
    # Conv weights are stored channels-last (common.models.factory.channels_last).
    shared, local = get_shared_state(net, fedbn=False), get_local_state(net)
    assert all(a.flags.c_contiguous for a in [*shared.values(), *local.values()])
    assert local and all(a.shape == () for k, a in local.items() if k.endswith("num_batches_tracked"))
    other = build_staging(ModelConfig())
    set_shared_state(other, shared)
    for key, array in get_shared_state(other, fedbn=False).items():
        np.testing.assert_array_equal(array, shared[key])
