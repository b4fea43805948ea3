"""Update validation: what a site's reply must satisfy before it is aggregated."""

import numpy as np
import pytest

from server.validation import update_problem

REFERENCE = {"w": ((2, 3), "float32"), "b": ((3,), "float32")}


def good():
    return {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}


def test_sound_update_passes():
    assert update_problem(REFERENCE, good()) is None


def test_float16_on_the_wire_is_accepted():
    update = {k: v.astype(np.float16) for k, v in good().items()}
    assert update_problem(REFERENCE, update) is None


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda u: u.pop("b"), "missing 1 arrays (e.g. b)"),
        (lambda u: u.update(extra=np.zeros(1, np.float32)), "1 unexpected arrays (e.g. extra)"),
        (lambda u: u.update(w=np.zeros((3, 2), np.float32)), "array w has shape (3, 2), expected (2, 3)"),
        (lambda u: u.update(b=np.ones(3, np.int64)), "array b has dtype int64, expected float32"),
        (lambda u: u["w"].__setitem__((0, 0), np.nan), "array w holds 1 NaN/Inf values"),
        (lambda u: u["b"].__setitem__(1, np.inf), "array b holds 1 NaN/Inf values"),
    ],
)
def test_bad_updates_are_named(mutate, expected):
    update = good()
    mutate(update)
    assert update_problem(REFERENCE, update) == expected
