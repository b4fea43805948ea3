"""Building blocks shared by the encoder, the translation U-Net and the staging network."""

from __future__ import annotations

import torch
from torch import nn

NORMS: tuple[str, ...] = ("batch", "instance", "group")


def make_norm(norm: str, channels: int) -> nn.Module:
    """Return a 2-D normalisation layer for ``channels`` feature maps.

    Args:
        norm: ``"batch"`` (BatchNorm2d), ``"instance"`` (InstanceNorm2d with learned affine and
            no running statistics) or ``"group"`` (GroupNorm with up to 8 groups that divide
            ``channels``).
        channels: number of channels normalised.
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r} (set ModelConfig.norm)")


class ConvNormAct(nn.Sequential):
    """conv3x3 (no bias: the norm has one) -> norm -> ReLU -> optional dropout.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: str = "batch", dropout: float = 0.0
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


def conv_stack(in_channels: int, out_channels: int, n_convs: int, norm: str, dropout: float) -> nn.Sequential:
    """``n_convs`` ConvNormAct blocks, the first mapping ``in_channels`` to ``out_channels``."""
    return nn.Sequential(
        *(
            ConvNormAct(in_channels if i == 0 else out_channels, out_channels, norm, dropout)
            for i in range(n_convs)
        )
    )


class UpBlock(nn.Module):
    """Decoder step of a U-Net: 2x transposed-conv upsampling, concatenation with the skip, convs.

    Shapes: ``x (B, in_channels, h, w)`` and ``skip (B, skip_channels, 2h, 2w)`` ->
    ``(B, out_channels, 2h, 2w)``.
    """

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, n_convs: int, norm: str, dropout: float
    ) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.convs = conv_stack(out_channels + skip_channels, out_channels, n_convs, norm, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class AttentionPool(nn.Module):
    """Attention pooling over a set of tokens (Ilse et al. 2018): softmax(w^T tanh(V x)) weights.

    Shapes: ``tokens (N, L, D)`` and optional ``mask (N, L)`` bool, True = keep ->
    ``pooled (N, D)`` and ``weights (N, L)`` (zero where masked, rows sum to 1).
    Masked tokens get ``-inf`` scores, so their values never enter the softmax; every row must
    keep at least one token (the caller checks and says which sample broke the rule).
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(tokens).squeeze(-1).float()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        pooled = torch.einsum("nl,nld->nd", weights.to(tokens.dtype), tokens)
        return pooled, weights
