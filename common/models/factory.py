"""Model configuration and builders: one ``ModelConfig`` gives matching translation and staging nets."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from common.models.blocks import NORMS
from common.models.encoder import ENCODER_PRESETS
from common.models.staging import FUSIONS, StagingNet
from common.models.translation import TranslationUNet


@dataclass
class ModelConfig:
    """The model choices of a run (the ablation switches are ``fusion`` and ``pretrained``).

    Attributes:
        preset: encoder preset, a key of ``ENCODER_PRESETS`` (``"cpu-small"``, ``"vgg16"``).
        fusion: ``"attention"`` (paper) or ``"plain"`` (plain VGG baseline).
        pretrained: initialise the staging encoder from the MR-to-CT translation encoder
            (phase 1); ``False`` = random init (the "no self-supervised learning" ablation).
            The builders do not load weights; the caller applies ``load_pretrained_encoder``.
        n_protocols: P (``len(PreprocessSettings.protocols)``).
        n_classes: 4 (ARCO I-IV).
        norm: ``"batch"``, ``"instance"`` or ``"group"``.
        embed_dim, heads, dropout: attention-fusion width, heads and dropout.
    """

    preset: str = "cpu-small"
    fusion: str = "attention"
    pretrained: bool = True
    n_protocols: int = 5
    n_classes: int = 4
    norm: str = "batch"
    embed_dim: int = 128
    heads: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.preset not in ENCODER_PRESETS:
            raise ValueError(
                f"ModelConfig.preset must be one of {sorted(ENCODER_PRESETS)}, got {self.preset!r}"
            )
        if self.fusion not in FUSIONS:
            raise ValueError(f"ModelConfig.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.norm not in NORMS:
            raise ValueError(f"ModelConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.n_protocols < 1:
            raise ValueError(f"ModelConfig.n_protocols must be >= 1, got {self.n_protocols}")
        if self.n_classes < 2:
            raise ValueError(f"ModelConfig.n_classes must be >= 2, got {self.n_classes}")
        if self.embed_dim < 1 or self.heads < 1 or self.embed_dim % self.heads:
            raise ValueError(
                f"ModelConfig.heads ({self.heads}) must divide ModelConfig.embed_dim ({self.embed_dim})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")

    def encoder_kwargs(self) -> dict:
        """Keyword arguments of the shared ``VGGEncoder`` (identical for both networks)."""
        return dict(ENCODER_PRESETS[self.preset], norm=self.norm)


def build_translation(cfg: ModelConfig) -> TranslationUNet:
    """The MR-to-CT translation U-Net of ``cfg`` (1 channel in, 1 out, tanh output)."""
    return TranslationUNet(in_channels=1, out_channels=1, **cfg.encoder_kwargs())


def build_staging(cfg: ModelConfig) -> StagingNet:
    """The staging network of ``cfg`` (randomly initialised; see ``load_pretrained_encoder``)."""
    return StagingNet(
        encoder_kwargs=cfg.encoder_kwargs(),
        n_protocols=cfg.n_protocols,
        n_classes=cfg.n_classes,
        fusion=cfg.fusion,
        embed_dim=cfg.embed_dim,
        heads=cfg.heads,
        dropout=cfg.dropout,
    )


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


def norm_state_keys(module: nn.Module) -> list[str]:
    """State-dict keys (parameters and buffers) that belong to normalisation modules of ``module``.

    Chosen by module type (``norm_layer_types``), not by a substring of the layer name.
    """
    types = norm_layer_types()
    keys: list[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, types):
            prefix = f"{name}." if name else ""
            keys += [prefix + k for k in sub.state_dict()]
    return sorted(keys)
