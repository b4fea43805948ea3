"""The staging loss: class-weighted cross entropy, optionally with ordinal terms for ARCO's ordered stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StagingLoss(nn.Module):
    """Cross entropy weighted by ``class_weights``, plus ``ordinal_weight`` x the cumulative terms
    of an ordinal scale: at each cut k between neighbouring stages, the binary cross entropy of
    P(stage > k) (the softmax summed above the cut) against [label > k].

    Plain cross entropy pays the same for calling a stage II hip stage I or stage IV, and nothing
    in it asks that stage II score above stage I; the cumulative terms pay at every cut a
    prediction falls on the wrong side of. The 4-way softmax head stays as it is, so scoring,
    histograms and the delivered model are unchanged. Both terms are class-weighted means.
    """

    def __init__(self, class_weights: torch.Tensor, ordinal_weight: float = 0.0):
        super().__init__()
        self.register_buffer("class_weights", class_weights.float())
        self.ordinal_weight = float(ordinal_weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, labels, weight=self.class_weights)
        if not self.ordinal_weight:
            return loss
        log_p = logits.log_softmax(dim=1)
        cuts = range(logits.shape[1] - 1)
        above = torch.stack([torch.logsumexp(log_p[:, k + 1 :], dim=1) for k in cuts], dim=1)
        below = torch.stack([torch.logsumexp(log_p[:, : k + 1], dim=1) for k in cuts], dim=1)
        target = labels[:, None] > torch.arange(len(cuts), device=labels.device)
        nll = -torch.where(target, above, below).mean(dim=1)
        weight = self.class_weights[labels]
        return loss + self.ordinal_weight * (weight * nll).sum() / weight.sum()
