"""Tests of the MR-to-CT translation U-Net and its loss."""

from __future__ import annotations

import pytest
import torch

from common.models.encoder import ENCODER_PRESETS, VGGEncoder
from common.models.translation import TranslationLoss, TranslationUNet

CASES = [
    (dict(ENCODER_PRESETS["cpu-small"]), (2, 1, 48, 48), (2, 1, 48, 48)),
    (
        dict(ENCODER_PRESETS["cpu-small"], norm="instance", output_activation="none"),
        (1, 1, 16, 24),
        (1, 1, 16, 24),
    ),
    (dict(ENCODER_PRESETS["vgg16"]), (2, 1, 32, 32), (2, 1, 32, 32)),
    (
        dict(in_channels=2, out_channels=3, channels=(4, 8), convs_per_stage=(1, 1)),
        (2, 2, 8, 8),
        (2, 3, 8, 8),
    ),
]


@pytest.mark.parametrize("kwargs, input_shape, expected_shape", CASES)
def test_translation_output_shape(kwargs, input_shape, expected_shape):
    net = TranslationUNet(**kwargs)
    assert isinstance(net.encoder, VGGEncoder) and type(net.encoder) is VGGEncoder
    out = net(torch.randn(input_shape))
    assert tuple(out.shape) == expected_shape


def test_tanh_output_stays_in_normalised_hu_range():
    net = TranslationUNet(channels=(4, 8), convs_per_stage=(1, 1))
    out = net(100.0 * torch.randn(4, 1, 16, 16))
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_translation_rejects_unknown_activation():
    with pytest.raises(ValueError, match="output_activation"):
        TranslationUNet(output_activation="sigmoid")


def test_loss_is_zero_for_perfect_prediction_and_grows_with_error():
    loss = TranslationLoss()
    target = torch.rand(2, 1, 32, 32) * 2 - 1
    assert float(loss(target, target)) == pytest.approx(0.0, abs=1e-5)
    assert float(loss(target + 0.1, target)) < float(loss(target + 0.5, target))


def test_loss_weights_select_terms():
    target = torch.rand(2, 1, 32, 32) * 2 - 1
    pred = target + 0.2
    l1_only = TranslationLoss(l1_weight=1.0, ssim_weight=0.0)
    assert float(l1_only(pred, target)) == pytest.approx(0.2, abs=1e-5)
    ssim_only = TranslationLoss(l1_weight=0.0, ssim_weight=1.0)
    noisy = target + 0.3 * torch.randn_like(target)
    assert float(ssim_only(noisy, target)) > 0.05
    with pytest.raises(ValueError, match="weights"):
        TranslationLoss(l1_weight=0.0, ssim_weight=0.0)
