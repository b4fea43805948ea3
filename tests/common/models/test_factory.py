"""Tests of ModelConfig, the builders and the helpers the federation uses."""

from __future__ import annotations

import pytest
from torch import nn

from common.config import ModelConfig
from common.models.factory import build_staging, build_translation, count_parameters, norm_layer_types
from common.models.staging import StagingNet
from common.models.translation import TranslationUNet
from common.training.weights import local_norm_keys


@pytest.mark.parametrize("preset", ["cpu-small", "vgg16"])
@pytest.mark.parametrize("fusion", ["attention", "plain"])
def test_builders_share_the_encoder_layout(preset, fusion):
    cfg = ModelConfig(preset=preset, fusion=fusion)
    translation, staging = build_translation(cfg), build_staging(cfg)
    assert isinstance(translation, TranslationUNet) and isinstance(staging, StagingNet)
    assert staging.fusion == fusion
    translation_encoder = {k: v.shape for k, v in translation.encoder.state_dict().items()}
    staging_encoder = {k: v.shape for k, v in staging.encoder.state_dict().items()}
    assert translation_encoder == staging_encoder


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(preset="resnet"), "preset"),
        (dict(fusion="concat"), "fusion"),
        (dict(norm="layer"), "norm"),
        (dict(n_protocols=0), "n_protocols"),
        (dict(heads=3), "heads"),
    ],
)
def test_model_config_validates(kwargs, message):
    with pytest.raises(ValueError, match=f"ModelConfig.{message}"):
        ModelConfig(**kwargs)


def test_count_parameters_counts_trainable_only_by_default():
    layer = nn.Linear(3, 2)
    assert count_parameters(layer) == 8
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 6
    assert count_parameters(layer, trainable_only=False) == 8


def test_cpu_small_is_small():
    assert count_parameters(build_staging(ModelConfig())) < 1_000_000


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_local_norm_keys_select_norm_modules_by_type(norm):
    staging = build_staging(ModelConfig(norm=norm))
    keys = local_norm_keys(staging)
    modules = dict(staging.named_modules())
    assert keys
    for key in keys:
        owner = modules[key.rsplit(".", 1)[0]]
        assert isinstance(owner, norm_layer_types())
    conv_keys = [k for k in staging.state_dict() if isinstance(modules.get(k.rsplit(".", 1)[0]), nn.Conv2d)]
    assert conv_keys and not set(conv_keys) & set(keys)
    if norm == "batch":
        assert any(k.endswith("running_var") for k in keys)


def test_built_nets_keep_channels_last_maps_and_the_layout_changes_no_value():
    import torch

    torch.manual_seed(0)
    staging = build_staging(ModelConfig()).eval()
    conv = [m for m in staging.encoder.modules() if isinstance(m, nn.Conv2d)][-1]  # 64 -> 128 channels
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    image, available = torch.randn(2, 5, 8, 48, 48), torch.ones(2, 5, dtype=torch.bool)
    features = staging.encoder(image[:, 0].reshape(-1, 1, 48, 48))
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features)

    contiguous = build_staging(ModelConfig()).eval()
    contiguous.load_state_dict(staging.state_dict())
    contiguous = contiguous.to(memory_format=torch.contiguous_format)
    assert [m for m in contiguous.encoder.modules() if isinstance(m, nn.Conv2d)][-1].weight.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(
            staging(image, available), contiguous(image, available), atol=1e-4, rtol=1e-4
        )
