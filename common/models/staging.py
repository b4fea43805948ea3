"""ONFH staging network: shared VGG encoder + attention fusion (or the plain VGG baseline)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from common.models.blocks import AttentionPool
from common.models.encoder import VGGEncoder

FUSIONS: tuple[str, ...] = ("attention", "plain")


class StagingNet(nn.Module):
    """Four-way ARCO staging of one hip from up to ``n_protocols`` MR protocols.

    The shared :class:`VGGEncoder` (the part pretrained by MR-to-CT translation) encodes every
    slice of every *available* protocol as a 1-channel image; slices of missing protocols are
    never encoded (so their pixels cannot leak in, not even through BatchNorm batch statistics).

    ``fusion="attention"`` (the paper's model):
      1. intra-modality, spatial: the last feature map ``(C, h, w)`` is projected to
         ``embed_dim`` per position and attention-pooled over the ``h*w`` positions -> one
         token per slice;
      2. intra-modality, slices: attention pooling over the K slice tokens -> one token per
         protocol (no slice-order embedding: K varies with the HipGrid);
      3. inter-modality: one pre-norm transformer layer (``nn.MultiheadAttention``
         self-attention + MLP) over the P protocol tokens plus learned protocol embeddings;
         missing protocols are excluded with ``key_padding_mask``, never zero-filled into the
         softmax;
      4. attention pooling over the available protocol tokens, then a linear classifier.

    ``fusion="plain"`` (the plain VGG baseline): the same encoder, global average pooling,
    mean over slices, concatenation over protocols, MLP. A missing protocol's feature block is
    zero, which removes it from the first linear layer (W_p @ 0 = 0); the availability mask is
    appended to the concatenation so the MLP can tell "missing" from "dark" and shift its bias.

    Args:
        encoder_kwargs: keyword arguments of :class:`VGGEncoder` (``in_channels`` must be 1).
        n_protocols: P.
        n_classes: number of stages (4: ARCO I-IV, class index = stage - 1).
        fusion: ``"attention"`` or ``"plain"``.
        embed_dim: token width of the attention fusion / hidden width of the plain MLP.
        heads: attention heads of the inter-modality attention (must divide ``embed_dim``).
        dropout: dropout in the fusion and the classifier.

    Shapes: ``forward(image (B, P, K, H, W) float, available (B, P) bool)`` -> logits
    ``(B, n_classes)``; with ``return_attention=True`` also a dict of attention weights:
    ``"slice" (B, P, K)``, ``"protocol" (B, P)``, ``"spatial" (B, P, K, h, w)`` (zeros for
    missing protocols; empty dict for the plain fusion). Every sample needs at least one
    available protocol.
    """

    def __init__(
        self,
        encoder_kwargs: Mapping[str, Any] | None = None,
        n_protocols: int = 5,
        n_classes: int = 4,
        fusion: str = "attention",
        embed_dim: int = 128,
        heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        encoder_kwargs = dict(encoder_kwargs or {})
        if encoder_kwargs.get("in_channels", 1) != 1:
            raise ValueError("StagingNet: the encoder sees one slice at a time, so in_channels must be 1")
        if n_protocols < 1:
            raise ValueError(f"StagingNet: n_protocols must be >= 1, got {n_protocols}")
        if n_classes < 2:
            raise ValueError(f"StagingNet: n_classes must be >= 2, got {n_classes}")
        if fusion not in FUSIONS:
            raise ValueError(
                f"StagingNet: fusion must be one of {FUSIONS}, got {fusion!r} (ModelConfig.fusion)"
            )
        if embed_dim < 1 or heads < 1 or embed_dim % heads:
            raise ValueError(f"StagingNet: heads ({heads}) must divide embed_dim ({embed_dim})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"StagingNet: dropout must be in [0, 1), got {dropout}")
        self.n_protocols, self.n_classes, self.fusion = n_protocols, n_classes, fusion
        self.encoder = VGGEncoder(**encoder_kwargs)
        width = self.encoder.out_channels
        if fusion == "attention":
            self.project = nn.Sequential(nn.Linear(width, embed_dim), nn.LayerNorm(embed_dim), nn.ReLU())
            self.spatial_pool = AttentionPool(embed_dim)
            self.slice_pool = AttentionPool(embed_dim)
            self.protocol_embedding = nn.Parameter(torch.zeros(n_protocols, embed_dim))
            nn.init.trunc_normal_(self.protocol_embedding, std=0.02)
            self.inter_norm = nn.LayerNorm(embed_dim)
            self.inter_attention = nn.MultiheadAttention(embed_dim, heads, dropout=dropout, batch_first=True)
            self.mlp_norm = nn.LayerNorm(embed_dim)
            self.mlp = nn.Sequential(
                nn.Linear(embed_dim, 2 * embed_dim),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(2 * embed_dim, embed_dim),
            )
            self.protocol_pool = AttentionPool(embed_dim)
            self.classifier = nn.Sequential(
                nn.LayerNorm(embed_dim), nn.Dropout(dropout), nn.Linear(embed_dim, n_classes)
            )
        else:
            self.classifier = nn.Sequential(
                nn.Linear(n_protocols * width + n_protocols, embed_dim),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(embed_dim, n_classes),
            )

    def _check_inputs(self, image: torch.Tensor, available: torch.Tensor) -> None:
        if image.ndim != 5:
            raise ValueError(f"StagingNet expects image (B, P, K, H, W), got shape {tuple(image.shape)}")
        if image.shape[1] != self.n_protocols:
            raise ValueError(
                f"StagingNet was built for {self.n_protocols} protocols but the image has {image.shape[1]}; "
                "set ModelConfig.n_protocols to len(PreprocessSettings.protocols)"
            )
        if available.shape != image.shape[:2] or available.dtype != torch.bool:
            raise ValueError(
                f"StagingNet expects available (B, P) bool matching the image, got {tuple(available.shape)} "
                f"{available.dtype}"
            )
        empty = (~available.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"StagingNet: samples {empty} of the batch have no available protocol; drop such hips"
            )

    def _encode_available(
        self, image: torch.Tensor, available: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the slices of available protocols: ``(N_avail * K, C, h, w)`` and their (b, p) index."""
        index = available.nonzero()  # (N_avail, 2): (sample, protocol)
        slices = image[index[:, 0], index[:, 1]]  # (N_avail, K, H, W)
        n_avail, k, h, w = slices.shape
        features = self.encoder(slices.reshape(n_avail * k, 1, h, w))[-1]
        return features, index

    def forward(
        self, image: torch.Tensor, available: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check_inputs(image, available)
        batch, n_protocols, n_slices = image.shape[:3]
        features, index = self._encode_available(image, available)
        n_avail, (width, fh, fw) = index.shape[0], features.shape[1:]

        if self.fusion == "plain":
            pooled = features.mean(dim=(2, 3)).reshape(n_avail, n_slices, width).mean(dim=1)
            blocks = features.new_zeros(batch, n_protocols, width)
            blocks[index[:, 0], index[:, 1]] = pooled
            flat = torch.cat([blocks.flatten(1), available.to(blocks.dtype)], dim=1)
            logits = self.classifier(flat)
            return (logits, {}) if return_attention else logits

        tokens = self.project(features.flatten(2).transpose(1, 2))  # (N_avail*K, h*w, D)
        slice_tokens, spatial_weights = self.spatial_pool(tokens)
        slice_tokens = slice_tokens.reshape(n_avail, n_slices, -1)
        protocol_tokens_avail, slice_weights = self.slice_pool(slice_tokens)
        dim = protocol_tokens_avail.shape[-1]
        protocol_tokens = protocol_tokens_avail.new_zeros(batch, n_protocols, dim)
        protocol_tokens[index[:, 0], index[:, 1]] = protocol_tokens_avail
        protocol_tokens = protocol_tokens + self.protocol_embedding.to(protocol_tokens.dtype)

        normed = self.inter_norm(protocol_tokens)
        attended, _ = self.inter_attention(
            normed, normed, normed, key_padding_mask=~available, need_weights=False
        )
        protocol_tokens = protocol_tokens + attended
        protocol_tokens = protocol_tokens + self.mlp(self.mlp_norm(protocol_tokens))
        hip_token, protocol_weights = self.protocol_pool(protocol_tokens, mask=available)
        logits = self.classifier(hip_token)
        if not return_attention:
            return logits

        slice_full = slice_weights.new_zeros(batch, n_protocols, n_slices)
        slice_full[index[:, 0], index[:, 1]] = slice_weights
        spatial_full = spatial_weights.new_zeros(batch, n_protocols, n_slices, fh, fw)
        spatial_full[index[:, 0], index[:, 1]] = spatial_weights.reshape(n_avail, n_slices, fh, fw)
        return logits, {"slice": slice_full, "protocol": protocol_weights, "spatial": spatial_full}
