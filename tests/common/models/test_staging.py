"""Tests of the staging network: shapes, attention maps, missing-protocol invariance."""

from __future__ import annotations

import pytest
import torch

from common.models.encoder import ENCODER_PRESETS
from common.models.staging import StagingNet

SMALL = dict(ENCODER_PRESETS["cpu-small"])
TINY = dict(channels=(4, 8), convs_per_stage=(1, 1))

CASES = [
    # (constructor kwargs, input shape (B, P, K, H, W), expected logits shape)
    (dict(encoder_kwargs=SMALL), (2, 5, 8, 48, 48), (2, 4)),
    (dict(encoder_kwargs=SMALL, fusion="plain"), (2, 5, 8, 48, 48), (2, 4)),
    (
        dict(encoder_kwargs=dict(SMALL, norm="group"), n_protocols=3, embed_dim=32, heads=2),
        (3, 3, 2, 16, 16),
        (3, 4),
    ),
    (
        dict(encoder_kwargs=TINY, n_protocols=2, n_classes=3, fusion="plain", embed_dim=16),
        (4, 2, 3, 8, 8),
        (4, 3),
    ),
    (dict(encoder_kwargs=dict(ENCODER_PRESETS["vgg16"])), (1, 5, 2, 32, 32), (1, 4)),
    (dict(encoder_kwargs=dict(ENCODER_PRESETS["vgg16"]), fusion="plain"), (1, 5, 2, 32, 32), (1, 4)),
]


@pytest.mark.parametrize("kwargs, input_shape, expected_shape", CASES)
def test_staging_logits_shape(kwargs, input_shape, expected_shape):
    net = StagingNet(**kwargs).eval()
    available = torch.ones(input_shape[:2], dtype=torch.bool)
    available[0, 0] = input_shape[1] == 1  # one missing protocol when there are several
    assert tuple(net(torch.randn(input_shape), available).shape) == expected_shape


def test_attention_maps_shapes_and_masking():
    net = StagingNet(encoder_kwargs=SMALL, embed_dim=32, heads=4).eval()
    image = torch.randn(2, 5, 3, 32, 32)
    available = torch.tensor([[True, False, True, True, False], [True, True, True, True, True]])
    logits, attention = net(image, available, return_attention=True)
    assert logits.shape == (2, 4)
    assert attention["slice"].shape == (2, 5, 3)
    assert attention["protocol"].shape == (2, 5)
    assert attention["spatial"].shape == (2, 5, 3, 4, 4)
    assert torch.all(attention["protocol"][~available] == 0)
    assert torch.allclose(attention["protocol"].sum(dim=1), torch.ones(2))
    assert torch.all(attention["slice"][~available] == 0)
    assert torch.allclose(attention["slice"][available].sum(dim=-1), torch.ones(int(available.sum())))
    spatial_sums = attention["spatial"].flatten(3).sum(dim=-1)
    assert torch.allclose(spatial_sums[available], torch.ones(int(available.sum()), 3))


@pytest.mark.parametrize("fusion", ["attention", "plain"])
@pytest.mark.parametrize("training", [False, True])
def test_output_ignores_pixels_of_missing_protocols(fusion, training):
    torch.manual_seed(0)
    net = StagingNet(encoder_kwargs=SMALL, fusion=fusion, embed_dim=32, heads=4, dropout=0.0)
    net.train(training)  # train mode: BatchNorm uses batch statistics, which must not see missing slices
    image = torch.randn(3, 5, 2, 16, 16)
    available = torch.tensor([[True, False, True, True, False], [False, True, True, True, True], [True] * 5])
    altered = image.clone()
    altered[~available] = 100.0 * torch.randn_like(altered[~available])
    with torch.no_grad():
        reference = net(image, available)
        changed = net(altered, available)
        # sanity: the output does depend on the pixels of an available protocol
        moved = image.clone()
        moved[0, 0] += 5.0
        other = net(moved, available)
    assert torch.equal(reference, changed)
    assert not torch.allclose(reference[0], other[0])


def test_all_missing_sample_is_rejected():
    net = StagingNet(encoder_kwargs=TINY, n_protocols=2, embed_dim=16)
    available = torch.tensor([[True, True], [False, False]])
    with pytest.raises(ValueError, match=r"samples \[1\]"):
        net(torch.randn(2, 2, 1, 8, 8), available)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fusion="concat"), "fusion"),
        (dict(embed_dim=30, heads=4), "divide"),
        (dict(n_protocols=0), "n_protocols"),
        (dict(n_classes=1), "n_classes"),
        (dict(encoder_kwargs=dict(in_channels=3)), "in_channels"),
    ],
)
def test_staging_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StagingNet(**kwargs)


def test_wrong_protocol_count_names_the_setting():
    net = StagingNet(encoder_kwargs=TINY, n_protocols=5, embed_dim=16)
    with pytest.raises(ValueError, match="n_protocols"):
        net(torch.randn(1, 4, 1, 8, 8), torch.ones(1, 4, dtype=torch.bool))
