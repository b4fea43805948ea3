"""The staging loss (common/training/losses.py): plain weighted cross entropy when the ordinal
weight is 0, and ordinal terms that charge a far mistake more than a near one."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.config import RunConfig
from common.training.losses import StagingLoss

WEIGHTS = torch.tensor([1.0, 2.0, 0.5, 1.5])


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows).clamp_min(1e-9).log()  # softmax of log p is p


def test_without_ordinal_terms_it_is_the_weighted_cross_entropy():
    logits, labels = torch.randn(9, 4, generator=torch.Generator().manual_seed(0)), torch.arange(9) % 4
    expected = nn.CrossEntropyLoss(weight=WEIGHTS)(logits, labels)
    assert torch.allclose(StagingLoss(WEIGHTS)(logits, labels), expected)


def test_the_ordinal_terms_by_hand():
    # A stage II hip given I or II at 0.5 each: P(stage > I) = 0.5, P(> II) = P(> III) = 0.
    logits, labels = logits_of([0.5, 0.5, 0.0, 0.0]), torch.tensor([1])
    loss = StagingLoss(torch.ones(4), ordinal_weight=2.0)(logits, labels)
    assert loss.item() == pytest.approx(math.log(2) + 2.0 * math.log(2) / 3, rel=1e-5)


def test_a_far_mistake_costs_more_than_a_near_one_at_equal_cross_entropy():
    # Both give the true stage II 0.5; one puts the rest on stage I, the other on stage IV.
    near, far, labels = logits_of([0.5, 0.5, 0, 0]), logits_of([0, 0.5, 0, 0.5]), torch.tensor([1])
    plain, ordinal = StagingLoss(WEIGHTS), StagingLoss(WEIGHTS, ordinal_weight=1.0)
    assert plain(near, labels).item() == pytest.approx(plain(far, labels).item())
    # The far one falls on the wrong side of two cuts (above II, above III), the near one of one cut.
    assert ordinal(far, labels).item() - ordinal(near, labels).item() == pytest.approx(
        math.log(2) / 3, rel=1e-4
    )


def test_its_gradient_orders_neighbouring_stages():
    # From a model blind to stage I vs II, one step on stage II hips raises P(II) and above.
    logits = torch.zeros(4, 4, requires_grad=True)
    StagingLoss(WEIGHTS, ordinal_weight=1.0)(logits, torch.full((4,), 1)).backward()
    assert torch.all(logits.grad[:, 0] > 0) and torch.all(logits.grad[:, 1] < 0)
    assert torch.isfinite(logits.grad).all()


def test_the_run_setting_reaches_local_training_and_a_negative_weight_is_refused():
    assert RunConfig(stage_ordinal_weight=0.5).stage_training(0, 1).ordinal_weight == 0.5
    assert RunConfig().stage_training(0, 1).ordinal_weight == 0.0
    with pytest.raises(ValueError, match="'stage-ordinal-weight' = -1.0 is invalid"):
        RunConfig(stage_ordinal_weight=-1.0)
