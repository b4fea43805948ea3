"""Local training and evaluation loops for the translation and staging networks (no Flower here)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from sklearn.metrics import log_loss
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.config import TrainConfig
from common.models.translation import TranslationLoss
from common.training.augmentation import BatchAugmentation
from common.training.datasets import dataset_class_indices
from common.training.device import autocast_context, grad_scaler, seed_everything, select_device
from common.training.losses import StagingLoss
from common.training.metrics import macro_auroc, translation_metrics

Progress = Callable[[str], None]


def proximal_term(net: nn.Module, reference: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx penalty ``mu/2 * sum ||w - w_ref||^2`` over the parameters named in ``reference``.

    ``reference`` maps parameter names to tensors on the parameters' device (see
    ``reference_parameters``). Returns a differentiable scalar.
    """
    params = dict(net.named_parameters())
    total = torch.zeros((), device=next(net.parameters()).device)
    for name, ref in reference.items():
        total = total + (params[name].float() - ref).pow(2).sum()
    return 0.5 * mu * total


def reference_parameters(
    net: nn.Module, reference_state: Mapping[str, Any] | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """Detached float copies of the FedProx anchor weights, keyed by parameter name.

    ``reference_state`` is the round's global state dict (tensors or numpy arrays); None uses
    the network's current weights (which, in a federated round, are the global ones just
    loaded). Parameters absent from ``reference_state`` (e.g. FedBN's site-local norm layers)
    are not pulled towards anything.
    """
    params = {name: p for name, p in net.named_parameters() if p.requires_grad}
    if reference_state is None:
        return {name: p.detach().float().clone().to(device) for name, p in params.items()}
    reference = {
        name: (value.detach() if torch.is_tensor(value) else torch.tensor(np.asarray(value)))
        .float()
        .to(device)
        for name, value in reference_state.items()
        if name in params
    }
    mismatched = [
        f"{n}: {tuple(r.shape)} vs {tuple(params[n].shape)}"
        for n, r in reference.items()
        if r.shape != params[n].shape
    ]
    if mismatched:
        raise ValueError(f"FedProx reference_state does not match the network's shapes: {mismatched[:5]}")
    if not reference:
        raise ValueError(
            "FedProx reference_state shares no parameter names with the network "
            f"(reference keys like {list(reference_state)[:3]}, network keys like {list(params)[:3]})"
        )
    return reference


def staging_class_weights(class_indices: np.ndarray, n_classes: int = 4) -> torch.Tensor:
    """Inverse-frequency cross-entropy weights ``N / (n_present * count_c)``; 0 for absent classes.

    An absent class never appears as a target, so its weight is never used in the loss; 0
    keeps it out of the weighted-mean denominator and makes the choice explicit.
    """
    counts = np.bincount(np.asarray(class_indices, dtype=np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def _loader(
    dataset: Dataset, batch_size: int, shuffle: bool, cfg_seed: int, num_workers: int, device: torch.device
) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg_seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


def _timed(loader: DataLoader) -> Iterable[tuple[dict[str, torch.Tensor], float]]:
    """Yield each batch with the seconds spent blocked waiting for it."""
    iterator = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


def _check_non_empty(dataset: Dataset, what: str) -> None:
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty: this site has no samples for it; skip the site or fix its data")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(
    net: nn.Module,
    loss: torch.Tensor,
    reference: Mapping[str, torch.Tensor] | None,
    mu: float,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> None:
    """One optimiser step on ``loss`` (+ the FedProx term when a reference is given)."""
    total = loss + proximal_term(net, reference, mu) if reference is not None else loss
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()


def train_translation(
    net: nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    reference_state: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    loss_fn: nn.Module | None = None,
) -> dict[str, Any]:
    """Train the MR-to-CT translation network in place on ``dataset`` (a ``PairDataset``).

    Args:
        net: a ``TranslationUNet`` (moved to the configured device).
        dataset: items ``{"mr": (1, H, W), "ct": (1, H, W)}``.
        cfg: training settings.
        reference_state: FedProx anchor (the round's global weights), used if
            ``cfg.proximal_mu > 0``; None = the weights ``net`` starts with.
        progress: optional callback receiving one line per epoch.
        loss_fn: loss on ``(pred, target)``; default ``TranslationLoss()`` (L1 + SSIM).

    Returns:
        ``{"loss": mean loss of the last epoch, "loss_per_epoch": [...], "n_samples": len(dataset),
        "seconds": wall time, "data_wait_share": share of loop time blocked on the DataLoader,
        "epochs": cfg.epochs}``.
    """
    _check_non_empty(dataset, "translation training set")
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    net.to(device).train()
    loss_fn = (loss_fn or TranslationLoss()).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = grad_scaler(device, cfg.amp)
    reference = reference_parameters(net, reference_state, device) if cfg.proximal_mu > 0 else None
    loader = _loader(dataset, cfg.batch_size, True, cfg.seed, cfg.num_workers, device)
    augmentation = BatchAugmentation(cfg.seed) if cfg.augment else None
    start, waited, looped = time.perf_counter(), 0.0, 0.0
    losses: list[float] = []
    for epoch in range(cfg.epochs):
        epoch_start = time.perf_counter()
        loss_sum, seen = torch.zeros((), device=device), 0
        for batch, wait in _timed(loader):
            waited += wait
            mr = batch["mr"].to(device, non_blocking=True)
            ct = batch["ct"].to(device, non_blocking=True)
            if augmentation is not None:
                mr, ct = augmentation.pairs(mr, ct)
            with autocast_context(device, cfg.amp):
                pred = net(mr)
            loss = loss_fn(pred.float(), ct)
            _step(net, loss, reference, cfg.proximal_mu, optimizer, scaler)
            loss_sum += loss.detach() * len(mr)
            seen += len(mr)
        _sync(device)
        looped += time.perf_counter() - epoch_start
        losses.append(float(loss_sum) / seen)
        if progress:
            progress(f"translation epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.4f}")
    return {
        "loss": losses[-1],
        "loss_per_epoch": losses,
        "n_samples": len(dataset),
        "seconds": time.perf_counter() - start,
        "data_wait_share": waited / looped if looped > 0 else 0.0,
        "epochs": cfg.epochs,
    }


def predict_staging(
    net: nn.Module, dataset: Dataset, device: torch.device | str | None = None, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities of every hip of ``dataset`` (eval mode, float32, no augmentation).

    Returns:
        ``probs`` float64 ``(N, n_classes)`` (softmax) and ``labels`` int64 ``(N,)`` class indices.
    """
    device = next(net.parameters()).device if device is None else torch.device(device)
    was_training = net.training
    net.to(device).eval()
    probs, labels = [], []
    try:
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                logits = net(batch["image"].to(device), batch["available"].to(device))
                probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
                labels.append(batch["label"].numpy())
    finally:
        net.train(was_training)
    n_classes = getattr(net, "n_classes", 4)
    if not probs:
        return np.zeros((0, n_classes)), np.zeros((0,), dtype=np.int64)
    probs_all = np.concatenate(probs).astype(np.float64)
    probs_all /= probs_all.sum(axis=1, keepdims=True)  # exact in float64 (sklearn checks the sums)
    return probs_all, np.concatenate(labels).astype(np.int64)


def _validation_score(
    net: nn.Module, val_ds: Dataset, device: torch.device, batch_size: int
) -> tuple[float, float]:
    probs, labels = predict_staging(net, val_ds, device, batch_size)
    val_loss = float(log_loss(labels, probs, labels=list(range(probs.shape[1]))))
    return macro_auroc(probs, labels), val_loss


def _class_weights(net: nn.Module, train_ds: Dataset, class_weighted: bool) -> torch.Tensor:
    n_classes = getattr(net, "n_classes", 4)
    if not class_weighted:
        return torch.ones(n_classes)
    return staging_class_weights(dataset_class_indices(train_ds), n_classes)


def _staging_epoch(
    net: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    step: Callable[[torch.Tensor], None],
    augmentation: BatchAugmentation | None,
    device: torch.device,
    amp: bool,
) -> tuple[float, float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy, seconds blocked on the loader)."""
    net.train()
    waited = 0.0
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for batch, wait in _timed(loader):
        waited += wait
        image = batch["image"].to(device, non_blocking=True)
        available = batch["available"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        if augmentation is not None:
            image = augmentation.hips(image, available)
        with autocast_context(device, amp):
            logits = net(image, available)
        loss = loss_fn(logits.float(), label)
        step(loss)
        loss_sum += loss.detach() * len(label)
        correct += (logits.detach().argmax(dim=1) == label).sum()
        seen += len(label)
    _sync(device)
    return float(loss_sum) / seen, float(correct) / seen, waited


def train_staging(
    net: nn.Module,
    train_ds: Dataset,
    cfg: TrainConfig,
    val_ds: Dataset | None = None,
    reference_state: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune the staging network in place on ``train_ds`` (a ``HipDataset``).

    Cross entropy, class-weighted by ``staging_class_weights`` of the training labels when
    ``cfg.class_weighted``, with ordinal terms when ``cfg.ordinal_weight > 0`` (``StagingLoss``);
    FedProx term when ``cfg.proximal_mu > 0`` (anchor ``reference_state``, or the starting weights
    if None). With ``val_ds`` the validation macro AUROC (and loss) is computed after every epoch;
    with ``cfg.select_on_val`` the best epoch's weights (state dict, BatchNorm statistics
    included) are restored at the end.

    Returns:
        ``{"loss", "accuracy" (last epoch, on augmented training batches), "loss_per_epoch",
        "n_samples", "seconds", "data_wait_share", "epochs", "best_epoch" (1-based),
        "class_weights"}`` plus ``"val_macro_auroc"``, ``"val_loss"`` (of the kept epoch) and
        ``"val_macro_auroc_per_epoch"`` when ``val_ds`` is given.
    """
    _check_non_empty(train_ds, "staging training set")
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    net.to(device).train()
    class_weights = _class_weights(net, train_ds, cfg.class_weighted)
    loss_fn = StagingLoss(class_weights, cfg.ordinal_weight).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = grad_scaler(device, cfg.amp)
    reference = reference_parameters(net, reference_state, device) if cfg.proximal_mu > 0 else None
    loader = _loader(train_ds, cfg.batch_size, True, cfg.seed, cfg.num_workers, device)
    validate = val_ds is not None and len(val_ds) > 0
    augmentation = BatchAugmentation(cfg.seed) if cfg.augment else None

    def step(loss: torch.Tensor) -> None:
        _step(net, loss, reference, cfg.proximal_mu, optimizer, scaler)

    start, waited, looped = time.perf_counter(), 0.0, 0.0
    losses, accuracies, val_aurocs, val_losses = [], [], [], []
    best_key, best_epoch, best_state = None, cfg.epochs, None
    for epoch in range(cfg.epochs):
        epoch_start = time.perf_counter()
        loss, accuracy, wait = _staging_epoch(net, loader, loss_fn, step, augmentation, device, cfg.amp)
        waited += wait
        looped += time.perf_counter() - epoch_start
        losses.append(loss)
        accuracies.append(accuracy)
        line = f"staging epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.4f} acc {accuracies[-1]:.3f}"
        if validate:
            auroc, val_loss = _validation_score(net, val_ds, device, cfg.batch_size)
            val_aurocs.append(auroc)
            val_losses.append(val_loss)
            line += f" val AUROC {auroc:.3f} val loss {val_loss:.4f}"
            key = (auroc if np.isfinite(auroc) else -np.inf, -val_loss)
            if cfg.select_on_val and (best_key is None or key > best_key):
                best_key, best_epoch = key, epoch + 1
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if progress:
            progress(line)
    if best_state is not None:
        net.load_state_dict(best_state)
    result: dict[str, Any] = {
        "loss": losses[-1],
        "accuracy": accuracies[-1],
        "loss_per_epoch": losses,
        "n_samples": len(train_ds),
        "seconds": time.perf_counter() - start,
        "data_wait_share": waited / looped if looped > 0 else 0.0,
        "epochs": cfg.epochs,
        "best_epoch": best_epoch,
        "class_weights": class_weights.tolist(),
    }
    if validate:
        kept = best_epoch - 1
        result.update(
            val_macro_auroc=val_aurocs[kept], val_loss=val_losses[kept], val_macro_auroc_per_epoch=val_aurocs
        )
    return result


def evaluate_translation(
    net: nn.Module,
    dataset: Dataset,
    ct_window_hu: tuple[float, float] = (-200.0, 1400.0),
    device: torch.device | str | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """MAE (HU), PSNR and SSIM of the translation network on ``dataset`` (``PairDataset``).

    Returns ``{"mae_hu", "psnr", "ssim"}`` averaged over slices (each batch weighted by its
    size) and ``"n_samples"``.
    """
    _check_non_empty(dataset, "translation evaluation set")
    device = next(net.parameters()).device if device is None else torch.device(device)
    was_training = net.training
    net.to(device).eval()
    sums = {"mae_hu": 0.0, "psnr": 0.0, "ssim": 0.0}
    try:
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                pred = net(batch["mr"].to(device))
                values = translation_metrics(pred, batch["ct"].to(device), ct_window_hu)
                for key in sums:
                    sums[key] += values[key] * len(pred)
    finally:
        net.train(was_training)
    n = len(dataset)
    return {**{key: value / n for key, value in sums.items()}, "n_samples": n}
