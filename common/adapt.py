"""``onfh adapt SITE_DIR --model MODEL_DIR --out DIR``: a hospital fits a delivered model to its scanners.

For a site that did not take part in training (or joined later). Everything runs and stays at the
site, and the model it writes is a folder that ``onfh predict`` and ``onfh evaluate`` take.

Two steps, the second optional:

1. **Batch statistics, from unlabelled hips** (AdaBN, Li et al. 2016). Every batch-norm layer's
   running mean and variance are re-estimated on the hips the model is for (the ONFH hips of the
   site's train and validation patients); their stages are not read. Under FedBN this is what
   gives the site normalisation layers at all (they never leave a training site); the affine
   parameters keep the model's values (FedBN: their initial ones).
2. **Fine-tuning on a few labelled hips** (``--labels N``): the whole network, for ``--epochs``
   epochs at the run's staging learning rate, on ``N`` labelled hips of the site's train split,
   drawn patient by patient (both hips of a patient or neither, so one more hip may come). No
   validation split is used, so ``N`` is every label the adapted model has seen.

The ``test`` split is never touched: ``onfh evaluate --model OUT`` scores it afterwards. In our
benchmark (docs/benchmarks.md, Generalisation) fine-tuning on 4 or 8 labels lowered the AUROC and
16 about matched the model as delivered: adopt a fine-tuned model only if it does better on your
own validation split.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from common.cli import description
from common.config import RunConfig
from common.models.staging import StagingNet
from common.predict import load_model
from common.sitedata.load import SiteData, load_site
from common.training.datasets import HipDataset
from common.training.loops import train_staging

FINE_TUNE_EPOCHS = 10  # fixed before any adapted model was scored; no validation data to choose it


def adapt_batch_statistics(
    net: nn.Module, images: np.ndarray, available: np.ndarray, batch_size: int = 8
) -> int:
    """Re-estimate every batch-norm layer's running statistics on ``images`` (labels unused).

    The statistics become the plain average over the batches (momentum ``None``), computed in
    training mode without gradients; nothing else changes. Returns the number of layers adapted
    (0 for a model without batch norm, e.g. ``norm = "group"``).
    """
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers or len(images) == 0:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch
    device = next(net.parameters()).device
    dataset = HipDataset(images, available, np.ones(len(images), dtype=np.int64))
    was_training = net.training
    net.train()
    try:
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                net(batch["image"].to(device), batch["available"].to(device))
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        net.train(was_training)
    return len(layers)


def pick_labelled(data: SiteData, n: int | None, seed: int = 0) -> np.ndarray:
    """Indices (into ``data.staging_set("train")``) of labelled training hips, whole patients in a
    seeded order until at least ``n`` are reached (all of them for ``None``)."""
    keys = data.staging_patients("train")
    if n is None or n >= len(keys):
        return np.arange(len(keys))
    patients = np.unique(keys)
    order = np.random.default_rng(seed).permutation(len(patients))
    picked: list[int] = []
    for p in patients[order]:
        if len(picked) >= n:
            break
        picked.extend(np.flatnonzero(keys == p).tolist())
    return np.sort(np.asarray(picked, dtype=np.int64))  # a last patient's second hip may add one


def adapt(
    net: StagingNet,
    cfg: RunConfig,
    data: SiteData,
    labels: int | None = 0,
    epochs: int = FINE_TUNE_EPOCHS,
    seed: int = 0,
) -> dict:
    """Steps 1 and 2 of the module docstring on ``net`` in place; returns what was used.

    ``labels``: 0 adapts the batch statistics only; ``N`` also fine-tunes on ``N`` labelled
    training hips; ``None`` on all of them.
    """
    images, available, _ = data.staging_set("train", "val")
    info: dict = {
        "unlabelled-hips": int(len(images)),
        "batch-norm-layers": adapt_batch_statistics(net, images, available),
    }
    info["labelled-hips"] = 0
    if labels != 0:
        train_images, train_available, train_stages = data.staging_set("train")
        pick = pick_labelled(data, labels, seed)
        if len(pick) == 0:
            raise ValueError(f"{data.name} has no labelled training hip: fill arco_stage (1-4) in labels.csv")
        tcfg = cfg.stage_training(seed)
        tcfg.epochs, tcfg.select_on_val = epochs, False
        stats = train_staging(
            net, HipDataset(train_images[pick], train_available[pick], train_stages[pick]), tcfg
        )
        info.update({"labelled-hips": int(len(pick)), "epochs": epochs, "final-loss": float(stats["loss"]),
                     "stages-used": np.bincount(train_stages[pick], minlength=5)[1:].tolist()})  # fmt: skip
    net.eval()
    return info


def save_adapted(net: StagingNet, cfg: RunConfig, model_dir: Path, out: Path, info: dict) -> None:
    """Write the adapted model folder: weights, run config, ``adaptation.json`` and the source's card."""
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "final_model.npz", **{k: v.detach().cpu().numpy() for k, v in net.state_dict().items()})
    (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    for name in ("model_card.json", "model_card.md"):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    record = {
        "source-model": str(model_dir.resolve()),
        "adapted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
    }
    (out / "adaptation.json").write_text(json.dumps(record, indent=2))


def main(argv: list[str] | None = None) -> int:
    """``onfh adapt``: 0 on success, 2 on a user error, with a message naming the file and the fix."""
    parser = argparse.ArgumentParser(
        prog="onfh adapt",
        description=description(__doc__, full=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("site_dir", type=Path, help="the site's export: DICOM folders + labels.csv")
    parser.add_argument("--model", type=Path, required=True, help="model folder (delivered, or a run folder)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the adapted model")
    parser.add_argument(
        "--labels",
        default="0",
        help="labelled training hips to fine-tune on: 0 (batch statistics only, the default), N, or 'all'",
    )
    parser.add_argument("--epochs", type=int, default=FINE_TUNE_EPOCHS, help="fine-tuning epochs")
    parser.add_argument(
        "--cache", type=Path, default=None, help="preprocessing cache (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    try:
        labels = None if args.labels == "all" else int(args.labels)
        if labels is not None and labels < 0:
            raise ValueError
    except ValueError:
        print(f"onfh adapt: --labels {args.labels!r}: use 0, a positive number, or 'all'", file=sys.stderr)
        return 2
    if args.out.resolve() == args.model.resolve():
        print(
            "onfh adapt: --out must differ from --model (the delivered model is kept as it is)",
            file=sys.stderr,
        )
        return 2
    try:
        net, cfg, _ = load_model(args.model)  # missing FedBN layers are what step 1 supplies
        with tempfile.TemporaryDirectory() as tmp:
            data = load_site(
                args.site_dir,
                args.cache or Path(tmp),
                cfg.preprocess,
                split_seed=cfg.split_seed,
                fractions=cfg.split,
            )
            info = adapt(net, cfg, data, labels, args.epochs)
    except (ValueError, OSError) as exc:
        print(f"onfh adapt: {exc}", file=sys.stderr)
        return 2
    save_adapted(net, cfg, args.model, args.out, info)
    used = (
        f"{info['labelled-hips']} labelled hips, {args.epochs} epochs"
        if info["labelled-hips"]
        else "no labels"
    )
    print(
        f"adapted {info['batch-norm-layers']} batch-norm layers on {info['unlabelled-hips']} hips ({used}) -> {args.out}\n"
        f"next: onfh evaluate {args.site_dir} --model {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
