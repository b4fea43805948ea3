"""MR-to-CT translation U-Net (self-supervised pretraining) and its L1 + SSIM loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import SSIMLoss
from torch import nn

from common.models.blocks import UpBlock
from common.models.encoder import VGGEncoder

OUTPUT_ACTIVATIONS: tuple[str, ...] = ("tanh", "none")


class TranslationUNet(nn.Module):
    """U-Net whose encoder is a :class:`VGGEncoder`, mapping one MR slice to normalised CT.

    The decoder mirrors the encoder: each step upsamples 2x (transposed conv), concatenates
    the encoder feature of that resolution and applies ``convs_per_stage[i]`` conv blocks; a
    1x1 conv gives ``out_channels`` maps. ``output_activation="tanh"`` (default) bounds the
    output to [-1, 1], the range of the target (CT clipped to the window and mapped to
    [-1, 1]), so the prediction can never leave the window and SSIM's ``data_range=2`` holds;
    ``"none"`` gives a linear head (clamp before computing HU metrics).

    Args:
        in_channels: MR channels in (1).
        out_channels: CT channels out (1).
        channels, convs_per_stage, norm, dropout: passed to :class:`VGGEncoder`.
        output_activation: ``"tanh"`` or ``"none"``.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``, H and W divisible by
    ``encoder.downsampling``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        convs_per_stage: Sequence[int] = (1, 1, 2, 2),
        norm: str = "batch",
        dropout: float = 0.0,
        output_activation: str = "tanh",
    ) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"TranslationUNet: out_channels must be >= 1, got {out_channels}")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"TranslationUNet: output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}"
            )
        self.encoder = VGGEncoder(in_channels, channels, convs_per_stage, norm, dropout)
        widths, depths = self.encoder.channels, self.encoder.convs_per_stage
        # decoder[j] goes from stage (n-1-j) to stage (n-2-j)
        self.decoder = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i], depths[i], norm, dropout)
            for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)
        self.output_activation = output_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        y = features[-1]
        for up, skip in zip(self.decoder, reversed(features[:-1]), strict=True):
            y = up(y, skip)
        y = self.head(y)
        return torch.tanh(y) if self.output_activation == "tanh" else y


class TranslationLoss(nn.Module):
    """``l1_weight * L1 + ssim_weight * (1 - SSIM)`` between predicted and true normalised CT.

    Both inputs are normalised HU in [-1, 1]; SSIM (``monai.losses.SSIMLoss``, 2-D, Gaussian
    window) is computed on them shifted to [0, 2] with ``data_range=2``, because SSIM's
    luminance term assumes non-negative intensities.

    Shapes: ``pred, target (B, 1, H, W)`` -> scalar. ``win_size`` must not exceed H or W.
    """

    def __init__(self, l1_weight: float = 1.0, ssim_weight: float = 1.0, win_size: int = 7) -> None:
        super().__init__()
        if l1_weight < 0 or ssim_weight < 0 or l1_weight + ssim_weight == 0:
            raise ValueError(
                f"TranslationLoss: weights must be >= 0 and not both 0, got l1={l1_weight}, ssim={ssim_weight}"
            )
        self.l1_weight, self.ssim_weight = float(l1_weight), float(ssim_weight)
        self.l1 = nn.L1Loss()
        self.ssim = SSIMLoss(spatial_dims=2, data_range=2.0, win_size=win_size)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float(), target.float()
        loss = self.l1_weight * self.l1(pred, target)
        if self.ssim_weight > 0:
            loss = loss + self.ssim_weight * self.ssim(pred + 1.0, target + 1.0)
        return loss
