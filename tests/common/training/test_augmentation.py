"""Tests of the batched training augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.training.augmentation import BatchAugmentation


def _batch(b=6, p=3, k=4, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(b, p, k, size, size, generator=gen)
    available = torch.ones(b, p, dtype=torch.bool)
    available[0, 1] = False
    image[~available] = 0.0
    return image, available


def test_hips_keep_shapes_and_missing_protocols_zero_and_inputs_untouched():
    image, available = _batch()
    before = image.clone()
    augmentation = BatchAugmentation(seed=1)
    outs = [augmentation.hips(image, available) for _ in range(5)]
    assert all(o.shape == image.shape and o.dtype == torch.float32 for o in outs)
    assert all(torch.all(o[0, 1] == 0) for o in outs)  # missing protocol stays exactly zero
    assert torch.equal(image, before)  # the batch given is never modified
    assert any(not torch.allclose(o[0, 0], image[0, 0]) for o in outs)


def test_one_affine_per_hip_shared_by_all_slices_and_protocols():
    # a hip whose slices and protocols are all the same picture stays so, up to intensity and noise
    picture = torch.randn(1, 1, 1, 32, 32).expand(4, 2, 3, 32, 32).contiguous()
    augmentation = BatchAugmentation(seed=3)
    for _ in range(5):
        out = augmentation.hips(picture, torch.ones(4, 2, dtype=torch.bool))
        for hip in out:
            flat = hip.reshape(6, -1)
            corr = torch.corrcoef(flat)
            assert corr.min() > 0.95, corr.min()  # same geometry everywhere in the hip


def test_hips_differ_from_each_other_within_a_batch():
    picture = torch.randn(1, 1, 1, 32, 32).expand(8, 1, 1, 32, 32).contiguous()
    out = BatchAugmentation(seed=0).hips(picture, torch.ones(8, 1, dtype=torch.bool))
    distinct = {round(float((out[i] - out[0]).abs().mean()), 4) for i in range(1, 8)}
    assert len(distinct) > 1 and max(distinct) > 0.01  # each hip draws its own transform


def test_pairs_stay_registered_and_ct_in_range():
    gen = torch.Generator().manual_seed(0)
    mr = torch.randn(8, 1, 24, 24, generator=gen)
    ct = (mr * 0.5).clamp(-1, 1)
    augmentation = BatchAugmentation(seed=2)
    for _ in range(4):
        mr_aug, ct_aug = augmentation.pairs(mr, ct)
        assert mr_aug.shape == mr.shape and ct_aug.shape == ct.shape
        assert ct_aug.min() >= -1 and ct_aug.max() <= 1
        for m, c in zip(mr_aug, ct_aug, strict=True):
            # same spatial transform on both: CT still strongly correlated with its MR
            assert np.corrcoef(m.flatten(), c.flatten())[0, 1] > 0.8


def test_same_seed_same_augmentation():
    image, available = _batch()
    first = BatchAugmentation(seed=7).hips(image, available)
    second = BatchAugmentation(seed=7).hips(image, available)
    other = BatchAugmentation(seed=8).hips(image, available)
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_identity_when_no_transform_is_drawn(monkeypatch):
    # with every probability at zero the warp is the identity (normalised coordinates are right)
    import common.training.augmentation as aug

    for name in ("AFFINE_PROB", "SCALE_PROB", "SHIFT_PROB", "NOISE_PROB"):
        monkeypatch.setattr(aug, name, 0.0)
    image, available = _batch()
    out = BatchAugmentation(seed=0).hips(image, available)
    assert torch.allclose(out, image, atol=1e-5)


@pytest.mark.parametrize("shift", [(3.0, 0.0), (0.0, 3.0)])
def test_shift_is_in_pixels_along_the_right_axis(monkeypatch, shift):
    import common.training.augmentation as aug

    monkeypatch.setattr(aug, "AFFINE_PROB", 1.0)
    for name in ("SCALE_PROB", "SHIFT_PROB", "NOISE_PROB"):
        monkeypatch.setattr(aug, name, 0.0)
    augmentation = BatchAugmentation(seed=0)
    # a pure shift: rotation and scale drawn as zero
    monkeypatch.setattr(
        augmentation,
        "_uniform",
        lambda shape, half: torch.tensor([shift]) if shape == (1, 2) else torch.zeros(shape),
    )
    image = torch.zeros(1, 1, 1, 21, 21)
    image[0, 0, 0, 10, 10] = 1.0
    out = augmentation.hips(image, torch.ones(1, 1, dtype=torch.bool))[0, 0, 0]
    row, col = divmod(int(out.argmax()), 21)
    assert abs(row - 10) + abs(col - 10) == 3  # moved by 3 px
    assert (row != 10) == (shift[0] != 0)  # the first shift component moves rows (H)
