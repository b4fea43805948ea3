"""Network builders: one ``ModelConfig`` (``common.config``) gives matching translation and staging nets."""

from __future__ import annotations

import torch
from torch import nn

from common.config import ModelConfig
from common.models.encoder import ENCODER_PRESETS
from common.models.staging import StagingNet
from common.models.translation import TranslationUNet


def encoder_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments of the shared ``VGGEncoder`` (identical for both networks)."""
    return dict(ENCODER_PRESETS[cfg.preset], norm=cfg.norm)


def channels_last(net: nn.Module) -> nn.Module:
    """``net`` with its conv weights stored channels-last, so that activations follow (in place).

    Convolutions, pooling and ReLU run faster on channels-last maps: on 2 CPU cores a cpu-small
    training step is about 1.3x faster (docs/benchmarks.md, Models and training), and on CUDA it
    is the layout tensor cores want. The layout changes no value; ``get_shared_state`` sends
    C-ordered arrays whatever the layout.
    """
    return net.to(memory_format=torch.channels_last)


def build_translation(cfg: ModelConfig) -> TranslationUNet:
    """The MR-to-CT translation U-Net of ``cfg`` (1 channel in, 1 out, tanh output)."""
    return channels_last(TranslationUNet(in_channels=1, out_channels=1, **encoder_kwargs(cfg)))


def build_staging(cfg: ModelConfig) -> StagingNet:
    """The staging network of ``cfg`` (randomly initialised; see ``load_pretrained_encoder``)."""
    net = StagingNet(
        encoder_kwargs=encoder_kwargs(cfg),
        n_protocols=cfg.n_protocols,
        n_classes=cfg.n_classes,
        fusion=cfg.fusion,
        embed_dim=cfg.embed_dim,
        heads=cfg.heads,
        dropout=cfg.dropout,
    )
    return channels_last(net)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` by default)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def norm_layer_types() -> tuple[type[nn.Module], ...]:
    """Normalisation module types (BatchNorm, InstanceNorm, GroupNorm, LayerNorm).

    FedBN keeps the parameters and running statistics of these modules site-local.
    """
    return (
        nn.modules.batchnorm._BatchNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.GroupNorm,
        nn.LayerNorm,
    )
