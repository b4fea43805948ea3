"""VGG-style 2-D encoder shared by the MR-to-CT translation U-Net and the staging network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.models.blocks import NORMS, conv_stack

# "cpu-small" trains in minutes on 2 CPU cores at the default HipGrid (K=8, 48x48);
# "vgg16" is the VGG-16 convolutional trunk (13 convs) the paper's plain baseline names.
ENCODER_PRESETS: dict[str, dict[str, tuple[int, ...]]] = {
    "cpu-small": dict(channels=(16, 32, 64, 128), convs_per_stage=(1, 1, 2, 2)),
    "vgg16": dict(channels=(64, 128, 256, 512, 512), convs_per_stage=(2, 2, 3, 3, 3)),
}


class VGGEncoder(nn.Module):
    """VGG encoder: stages of conv3x3-norm-ReLU blocks, 2x2 max-pool between stages.

    Stage 0 runs at full resolution; every later stage starts with a 2x2 max-pool, so stage
    ``i`` has ``channels[i]`` maps at ``H / 2**i``. There is no pool after the last stage (the
    staging network attends over that map, and VGG's final pool would halve it to 3x3 or less).

    Args:
        in_channels: input channels (1: one MR slice).
        channels: output channels of each stage.
        convs_per_stage: number of conv blocks in each stage (same length as ``channels``).
        norm: ``"batch"``, ``"instance"`` or ``"group"``.
        dropout: Dropout2d probability after every conv block (0 disables it).

    Shapes: ``forward(x (B, in_channels, H, W))`` -> list of ``len(channels)`` tensors,
    ``(B, channels[i], H / 2**i, W / 2**i)``. H and W must be divisible by ``2**(n_stages - 1)``
    (``downsampling``) so the U-Net skips line up.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        convs_per_stage: Sequence[int] = (1, 1, 2, 2),
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels, convs_per_stage = tuple(int(c) for c in channels), tuple(int(n) for n in convs_per_stage)
        if in_channels < 1:
            raise ValueError(f"VGGEncoder: in_channels must be >= 1, got {in_channels}")
        if len(channels) < 1 or any(c < 1 for c in channels):
            raise ValueError(
                f"VGGEncoder: channels must be a non-empty sequence of positive ints, got {channels}"
            )
        if len(convs_per_stage) != len(channels) or any(n < 1 for n in convs_per_stage):
            raise ValueError(
                "VGGEncoder: convs_per_stage needs one positive int per stage "
                f"(len(channels)={len(channels)}), got {convs_per_stage}"
            )
        if norm not in NORMS:
            raise ValueError(f"VGGEncoder: norm must be one of {NORMS}, got {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"VGGEncoder: dropout must be in [0, 1), got {dropout}")
        self.channels = channels
        self.convs_per_stage = convs_per_stage
        self.stages = nn.ModuleList()
        previous = in_channels
        for i, (width, n_convs) in enumerate(zip(channels, convs_per_stage, strict=True)):
            convs = conv_stack(previous, width, n_convs, norm, dropout)
            self.stages.append(convs if i == 0 else nn.Sequential(nn.MaxPool2d(2), *convs))
            previous = width

    @property
    def out_channels(self) -> int:
        """Channels of the last stage's feature map."""
        return self.channels[-1]

    @property
    def downsampling(self) -> int:
        """Factor by which the last stage is smaller than the input (H and W must divide by it)."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4:
            raise ValueError(f"VGGEncoder expects (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[-1] % self.downsampling or x.shape[-2] % self.downsampling:
            raise ValueError(
                f"VGGEncoder: H and W must be divisible by {self.downsampling} for {len(self.channels)} stages, "
                f"got {tuple(x.shape[-2:])}; change HipGrid.size or the encoder preset"
            )
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
