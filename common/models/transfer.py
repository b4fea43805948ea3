"""Encoder transfer: the translation U-Net's pretrained encoder initialises the staging network."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from common.models.staging import StagingNet

# Explicit prefix mapping: TranslationUNet.encoder.* -> StagingNet.encoder.* (same VGGEncoder class).
TRANSLATION_ENCODER_PREFIX = "encoder."
STAGING_ENCODER_PREFIX = "encoder."


def encoder_state_from_translation(translation_state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Select the encoder entries of a ``TranslationUNet`` state dict, renamed for ``StagingNet``.

    Args:
        translation_state: a ``TranslationUNet.state_dict()`` (tensors, or numpy arrays as they
            arrive from the federation), including BatchNorm running statistics.

    Returns:
        ``{staging key: tensor}`` with every ``encoder.*`` entry (weights and buffers); the
        decoder and head are dropped.
    """
    mapped = {
        STAGING_ENCODER_PREFIX + key[len(TRANSLATION_ENCODER_PREFIX) :]: (
            value.detach() if torch.is_tensor(value) else torch.tensor(np.asarray(value))
        )
        for key, value in translation_state.items()
        if key.startswith(TRANSLATION_ENCODER_PREFIX)
    }
    if not mapped:
        raise ValueError(
            "encoder_state_from_translation: no 'encoder.*' keys in the state; pass TranslationUNet.state_dict() "
            f"(got keys like {list(translation_state)[:3]})"
        )
    return mapped


def load_pretrained_encoder(staging: StagingNet, translation_state: Mapping[str, Any]) -> list[str]:
    """Copy the pretrained translation encoder into ``staging.encoder`` in place.

    Every encoder entry of the staging net must be present with the same shape; otherwise a
    ``ValueError`` lists the offending keys (typically the two models were built from different
    presets or norms: use the same ``ModelConfig`` for both phases).

    Returns:
        the staging state-dict keys that were loaded, sorted.
    """
    source = encoder_state_from_translation(translation_state)
    target = {k: v for k, v in staging.state_dict().items() if k.startswith(STAGING_ENCODER_PREFIX)}
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    mismatched = [
        f"{k}: pretrained {tuple(source[k].shape)} vs staging {tuple(target[k].shape)}"
        for k in sorted(set(source) & set(target))
        if source[k].shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            "load_pretrained_encoder: the translation encoder does not match the staging encoder "
            "(were they built with the same ModelConfig.preset and norm?). "
            f"missing={missing[:5]} unexpected={unexpected[:5]} shape mismatches={mismatched[:5]}"
        )
    with torch.no_grad():
        for key, value in source.items():
            target[key].copy_(value.to(dtype=target[key].dtype))
    return sorted(source)
