"""Tests of the VGG encoder and its presets."""

from __future__ import annotations

import pytest
import torch

from common.models.encoder import ENCODER_PRESETS, VGGEncoder

CASES = [
    # (kwargs, input shape, expected shape of each stage's features)
    (
        dict(ENCODER_PRESETS["cpu-small"]),
        (2, 1, 48, 48),
        [(2, 16, 48, 48), (2, 32, 24, 24), (2, 64, 12, 12), (2, 128, 6, 6)],
    ),
    (
        dict(ENCODER_PRESETS["cpu-small"], norm="group", dropout=0.1),
        (3, 1, 32, 16),
        [(3, 16, 32, 16), (3, 32, 16, 8), (3, 64, 8, 4), (3, 128, 4, 2)],
    ),
    (
        dict(ENCODER_PRESETS["vgg16"], norm="instance"),
        (1, 1, 32, 32),
        [(1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8), (1, 512, 4, 4), (1, 512, 2, 2)],
    ),
    (dict(in_channels=3, channels=(8,), convs_per_stage=(1,)), (2, 3, 10, 10), [(2, 8, 10, 10)]),
]


@pytest.mark.parametrize("kwargs, input_shape, expected", CASES)
def test_encoder_feature_shapes(kwargs, input_shape, expected):
    encoder = VGGEncoder(**kwargs)
    features = encoder(torch.randn(input_shape))
    assert [tuple(f.shape) for f in features] == expected
    assert encoder.out_channels == expected[-1][1]


def test_vgg16_preset_has_thirteen_convs():
    encoder = VGGEncoder(**ENCODER_PRESETS["vgg16"])
    assert sum(isinstance(m, torch.nn.Conv2d) for m in encoder.modules()) == 13


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(channels=(16, 32), convs_per_stage=(1,)), "convs_per_stage"),
        (dict(channels=()), "channels"),
        (dict(norm="layer"), "norm"),
        (dict(dropout=1.0), "dropout"),
        (dict(in_channels=0), "in_channels"),
    ],
)
def test_encoder_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VGGEncoder(**kwargs)


def test_encoder_rejects_size_not_divisible():
    with pytest.raises(ValueError, match="divisible by 8"):
        VGGEncoder()(torch.randn(1, 1, 44, 48))
