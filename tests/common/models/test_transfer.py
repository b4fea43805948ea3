"""Tests of the encoder transfer from the translation U-Net to the staging network."""

from __future__ import annotations

import pytest
import torch

from common.config import ModelConfig
from common.models.factory import build_staging, build_translation
from common.models.transfer import encoder_state_from_translation, load_pretrained_encoder


def _trained_translation(cfg: ModelConfig):
    translation = build_translation(cfg)
    # move every weight and BatchNorm statistic away from its init so the copy is visible
    with torch.no_grad():
        for value in translation.state_dict().values():
            value.add_(torch.rand_like(value.float()).to(value.dtype) + 1)
    return translation


@pytest.mark.parametrize("fusion", ["attention", "plain"])
def test_transfer_copies_every_encoder_entry_exactly(fusion):
    cfg = ModelConfig(fusion=fusion)
    translation = _trained_translation(cfg)
    staging = build_staging(cfg)
    before = {k: v.clone() for k, v in staging.state_dict().items()}
    loaded = load_pretrained_encoder(staging, translation.state_dict())

    staging_state, translation_state = staging.state_dict(), translation.state_dict()
    encoder_keys = sorted(k for k in staging_state if k.startswith("encoder."))
    assert loaded == encoder_keys
    assert any(k.endswith("running_mean") for k in loaded)  # BatchNorm statistics travel too
    for key in encoder_keys:
        assert torch.equal(staging_state[key], translation_state[key]), key
    for key, value in staging_state.items():
        if not key.startswith("encoder."):
            assert torch.equal(value, before[key]), f"{key} outside the encoder changed"


def test_transfer_accepts_numpy_state():
    cfg = ModelConfig()
    translation = _trained_translation(cfg)
    numpy_state = {k: v.numpy() for k, v in translation.state_dict().items()}
    staging = build_staging(cfg)
    load_pretrained_encoder(staging, numpy_state)
    assert torch.equal(staging.encoder.stages[0][0][0].weight, translation.encoder.stages[0][0][0].weight)


def test_encoder_state_drops_decoder():
    state = encoder_state_from_translation(build_translation(ModelConfig()).state_dict())
    assert state and all(k.startswith("encoder.") for k in state)
    with pytest.raises(ValueError, match="encoder"):
        encoder_state_from_translation({"decoder.0.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    "translation_cfg, staging_cfg",
    [
        (ModelConfig(preset="cpu-small"), ModelConfig(preset="vgg16")),
        (ModelConfig(norm="batch"), ModelConfig(norm="group")),
    ],
)
def test_transfer_mismatch_is_a_clear_error(translation_cfg, staging_cfg):
    translation = build_translation(translation_cfg)
    staging = build_staging(staging_cfg)
    with pytest.raises(ValueError, match="same ModelConfig"):
        load_pretrained_encoder(staging, translation.state_dict())
