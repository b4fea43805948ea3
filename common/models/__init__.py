"""Networks of onfh-fl: VGG encoder, MR-to-CT translation U-Net, staging net, encoder transfer."""

from common.models.encoder import ENCODER_PRESETS, VGGEncoder
from common.models.factory import (
    ModelConfig,
    build_staging,
    build_translation,
    count_parameters,
    norm_layer_types,
    norm_state_keys,
)
from common.models.staging import StagingNet
from common.models.transfer import encoder_state_from_translation, load_pretrained_encoder
from common.models.translation import TranslationLoss, TranslationUNet

__all__ = [
    "ENCODER_PRESETS",
    "ModelConfig",
    "StagingNet",
    "TranslationLoss",
    "TranslationUNet",
    "VGGEncoder",
    "build_staging",
    "build_translation",
    "count_parameters",
    "encoder_state_from_translation",
    "load_pretrained_encoder",
    "norm_layer_types",
    "norm_state_keys",
]
