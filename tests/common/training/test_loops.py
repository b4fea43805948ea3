"""Tests of the local training loops, FedProx, class weights and device selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import ModelConfig, TrainConfig
from common.models.factory import build_staging, build_translation
from common.training.datasets import HipDataset, PairDataset
from common.training.device import autocast_context, grad_scaler, select_device
from common.training.loops import (
    evaluate_translation,
    predict_staging,
    proximal_term,
    reference_parameters,
    staging_class_weights,
    train_staging,
    train_translation,
)

CPU = dict(device="cpu", amp=False)


def _cfg(**kwargs) -> ModelConfig:
    """cpu-small for the 2-protocol toy hips."""
    return ModelConfig(n_protocols=2, **kwargs)


def _signal_hips(n=16, p=2, k=2, size=16, seed=0, missing=True):
    """Random hips whose stage sets a class-dependent bright square's position."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(1, 5), n // 4 + 1)[:n]
    images = rng.normal(scale=0.5, size=(n, p, k, size, size)).astype(np.float32)
    corners = [(0, 0), (0, size // 2), (size // 2, 0), (size // 2, size // 2)]
    for i, stage in enumerate(labels):
        r, c = corners[stage - 1]
        images[i, :, :, r : r + size // 2, c : c + size // 2] += 2.0
    available = np.ones((n, p), dtype=bool)
    if missing:
        available[::3, 1] = False
        images[~available] = 0.0
    return HipDataset(images, available, labels)


def _toy_pairs(n=16, size=16, seed=0):
    rng = np.random.default_rng(seed)
    mr = rng.normal(size=(n, size, size)).astype(np.float32)
    ct = np.tanh(0.8 * mr - 0.2).astype(np.float32)  # a learnable, pixelwise MR -> CT mapping
    return PairDataset(mr, ct)


def test_staging_overfits_tiny_signal_set():
    dataset = _signal_hips(size=16)
    net = build_staging(_cfg(dropout=0.0, embed_dim=64))
    cfg = TrainConfig(epochs=15, lr=3e-3, batch_size=8, augment=False, **CPU)
    result = train_staging(net, dataset, cfg)
    assert result["n_samples"] == 16 and result["best_epoch"] == 15
    probs, labels = predict_staging(net, dataset)
    assert probs.shape == (16, 4) and np.allclose(probs.sum(axis=1), 1)
    assert np.mean(probs.argmax(axis=1) == labels) >= 0.9
    assert result["loss_per_epoch"][-1] < result["loss_per_epoch"][0]
    assert 0.0 <= result["data_wait_share"] <= 1.0


def test_plain_fusion_trains_and_returns_metrics():
    dataset = _signal_hips(n=8)
    net = build_staging(_cfg(fusion="plain", embed_dim=16))
    result = train_staging(
        net, dataset, TrainConfig(epochs=2, batch_size=4, **CPU), val_ds=_signal_hips(n=8, seed=1)
    )
    assert {"loss", "accuracy", "val_macro_auroc", "val_loss", "best_epoch", "seconds"} <= set(result)
    assert 1 <= result["best_epoch"] <= 2 and len(result["val_macro_auroc_per_epoch"]) == 2


def test_select_on_val_restores_best_epoch_weights():
    train, val = _signal_hips(n=8), _signal_hips(n=8, seed=1)
    net = build_staging(_cfg(embed_dim=16))
    cfg = TrainConfig(epochs=3, batch_size=4, lr=5e-3, **CPU)
    result = train_staging(net, train, cfg, val_ds=val)
    probs, labels = predict_staging(net, val)
    from common.training.metrics import macro_auroc

    assert macro_auroc(probs, labels) == pytest.approx(result["val_macro_auroc"], abs=1e-6)
    assert result["val_macro_auroc"] == max(result["val_macro_auroc_per_epoch"])


def test_class_weights_inverse_frequency_and_absent_class_zero():
    weights = staging_class_weights(np.array([0, 0, 0, 1, 3, 3]))
    assert weights.tolist() == pytest.approx([6 / 9, 2.0, 0.0, 1.0])


def test_proximal_term_is_zero_at_reference_and_grows_when_weights_move():
    net = build_staging(_cfg(embed_dim=16))
    reference = reference_parameters(net, None, torch.device("cpu"))
    assert float(proximal_term(net, reference, mu=0.1).detach()) == 0.0
    with torch.no_grad():
        net.classifier[-1].weight.add_(0.5)
    moved = float(proximal_term(net, reference, mu=0.1).detach())
    expected = 0.5 * 0.1 * 0.25 * net.classifier[-1].weight.numel()
    assert moved == pytest.approx(expected, rel=1e-4)


def test_fedprox_keeps_weights_closer_to_the_global_ones():
    dataset = _signal_hips(n=8)
    start = build_staging(_cfg(embed_dim=16)).state_dict()
    distances = {}
    for mu in (0.0, 10.0):
        net = build_staging(_cfg(embed_dim=16))
        net.load_state_dict(start)
        train_staging(
            net,
            dataset,
            TrainConfig(epochs=2, batch_size=4, lr=5e-3, proximal_mu=mu, **CPU),
            reference_state=start,
        )
        distances[mu] = sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in net.named_parameters())
    assert 0 < distances[10.0] < distances[0.0]


def test_reference_state_accepts_numpy_and_rejects_foreign_keys():
    net = build_staging(_cfg(embed_dim=16))
    numpy_state = {k: v.numpy() for k, v in net.state_dict().items()}
    reference = reference_parameters(net, numpy_state, torch.device("cpu"))
    assert set(reference) == {n for n, _ in net.named_parameters()}
    with pytest.raises(ValueError, match="shares no parameter names"):
        reference_parameters(net, {"other.weight": np.zeros(2)}, torch.device("cpu"))


def test_translation_loop_reduces_loss_and_evaluates():
    dataset = _toy_pairs()
    net = build_translation(ModelConfig())
    before = evaluate_translation(net, dataset)
    result = train_translation(net, dataset, TrainConfig(epochs=5, batch_size=8, lr=3e-3, **CPU))
    after = evaluate_translation(net, dataset)
    assert result["loss_per_epoch"][-1] < result["loss_per_epoch"][0]
    assert result["n_samples"] == 16 and 0.0 <= result["data_wait_share"] <= 1.0
    assert after["mae_hu"] < before["mae_hu"]
    assert set(after) == {"mae_hu", "psnr", "ssim", "n_samples"} and after["n_samples"] == 16


def test_translation_with_fedprox_runs():
    net = build_translation(ModelConfig())
    result = train_translation(net, _toy_pairs(n=8), TrainConfig(epochs=1, proximal_mu=0.01, **CPU))
    assert np.isfinite(result["loss"])


def test_empty_training_set_is_a_clear_error():
    empty = HipDataset(np.zeros((0, 2, 1, 8, 8), np.float32), np.zeros((0, 2), bool), np.zeros(0, int))
    with pytest.raises(ValueError, match="empty"):
        train_staging(build_staging(_cfg()), empty, TrainConfig(**CPU))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epochs=0), "epochs"),
        (dict(lr=0), "lr"),
        (dict(batch_size=0), "batch_size"),
        (dict(proximal_mu=-1), "mu"),
    ],
)
def test_train_config_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device(" AUTO ").type == expected
    with pytest.raises(ValueError, match="not"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable GPU"):
            select_device("cuda")
        with pytest.raises(ValueError, match="no usable GPU"):
            select_device("cuda:1")


def test_amp_is_off_on_cpu():
    cpu = torch.device("cpu")
    with autocast_context(cpu, enabled=True):
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.float32
    assert not grad_scaler(cpu, enabled=True).is_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_on_cuda_uses_half_precision():
    cuda = torch.device("cuda")
    with autocast_context(cuda, enabled=True):
        out = torch.nn.Linear(4, 4).cuda()(torch.randn(2, 4, device=cuda))
    assert out.dtype in (torch.bfloat16, torch.float16)


def test_progress_callback_with_workers_and_source_arrays_untouched():
    dataset = _toy_pairs(n=8)
    mr_before = dataset.mr.copy()
    lines: list[str] = []
    cfg = TrainConfig(epochs=2, batch_size=4, augment=True, num_workers=2, **CPU)
    result = train_translation(build_translation(ModelConfig()), dataset, cfg, progress=lines.append)
    assert len(lines) == 2 and lines[0].startswith("translation epoch 1/2")
    assert np.array_equal(dataset.mr, mr_before)  # augmentation works on copies of the batch
    assert np.isfinite(result["loss"])
