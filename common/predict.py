"""``onfh predict STUDY_DIR --model RUN_DIR``: stage each hip of a study and show where the model looked.

Prints per-hip ARCO stage probabilities and the protocol attention weights, and saves a PNG
with, per hip, each protocol's most-attended slice overlaid with the spatial attention.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from common.cli import description
from common.config import STAGE_NAMES, RunConfig
from common.models.factory import build_staging
from common.models.staging import StagingNet
from common.sitedata.load import LABELS_FILE, SiteData, load_site
from common.training.weights import set_shared_state

# What the model is for, said in every output. The staging head has four outputs, the paper's ARCO
# I-IV: it was trained and validated on hips with ONFH only, so its answer for a healthy hip is a
# stage like any other (often confident). A fifth "no ONFH" output would be a detector, a second
# task with its own validation; the four-way AUROC stays the paper's.
SCOPE = (
    "scope: this model stages hips already diagnosed with ONFH (ARCO I-IV). It does not detect "
    "ONFH: a healthy hip also gets a stage, so a stage below says nothing about whether the hip "
    "has ONFH"
)


def load_model(run_dir: Path) -> tuple[StagingNet, RunConfig, list[str]]:
    """The staging network and run config of a run folder (``onfh simulate`` or ``onfh train``).

    Reads ``run_dir/run_config.json`` and ``run_dir/final_model.npz``. A federated model carries
    only the exchanged tensors: batch-norm step counters are never sent, and under FedBN the
    normalisation layers stay at the sites; such layers keep their initial values.

    Returns:
        ``(net in eval mode, run config, notes)``; ``notes`` lists tensors the file lacked.

    Raises:
        ValueError: a file is missing or unreadable, or the weights do not fit the model the
            run config describes (the message names the file and the fix).
    """
    config_path, model_path = run_dir / "run_config.json", run_dir / "final_model.npz"
    for path in (config_path, model_path):
        if not path.is_file():
            raise ValueError(
                f"{path} not found: --model must be a run folder written by 'onfh simulate' or "
                "'onfh train' (it holds run_config.json and final_model.npz)"
            )
    try:
        cfg = RunConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{config_path} is not a valid run config ({exc}); re-run training") from None
    net = build_staging(cfg.model)
    try:
        with np.load(model_path) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{model_path} cannot be read ({exc}); re-run training or copy it again") from None
    try:
        set_shared_state(net, arrays)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{model_path} does not fit the model of {config_path} ({exc}); keep the two files of one run together"
        ) from None
    missing = [k for k in net.state_dict() if k not in arrays and not k.endswith("num_batches_tracked")]
    notes = []
    if missing:
        notes.append(
            f"{model_path} lacks {len(missing)} tensors (e.g. {missing[0]}; FedBN keeps normalisation layers at "
            "the sites): they keep their initial values, so predictions may be off"
        )
    return net.eval(), cfg, notes


def predict_study(study_dir: Path, run_dir: Path, png: Path | None, batch_size: int = 8) -> list[dict]:
    """Stage every hip found in ``study_dir`` with the model of ``run_dir``.

    The study is preprocessed exactly as in training (same run config: protocols, crop grid)
    into a temporary cache, so nothing is written beside the study.

    Args:
        study_dir: DICOM of one or more patients, any folder structure (labels not needed).
        run_dir: run folder (see :func:`load_model`).
        png: where to save the attention figure (None: no figure).
        batch_size: hips per forward pass.

    Returns:
        One dict per hip: ``hip`` (pseudonym prefix + side), ``side``, ``probabilities``
        (stage name -> probability, summing to 1), ``predicted_stage`` and, for the attention
        fusion, ``protocol_attention`` (protocol -> weight, zero for a missing protocol).

    Raises:
        ValueError: bad run folder, missing study folder, or no hip could be cropped.
    """
    net, cfg, notes = load_model(run_dir)
    for note in notes:
        print(f"WARNING {note}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as cache:
        site = load_site(study_dir, Path(cache), cfg.preprocess)
    # labels.csv is optional here: its absence is not worth a warning.
    for problem in site.problems:
        if problem.severity != "info" and Path(problem.path).name != LABELS_FILE:
            print(f"{problem.severity.upper():7s} {problem}", file=sys.stderr)
    if len(site.sides) == 0:
        raise ValueError(
            f"no femoral head could be cropped from {study_dir} (no usable MR series found); "
            f"run 'onfh check {study_dir}' to see what is missing"
        )
    logits, attention = _forward(net, site.images, site.available, batch_size)
    probs = torch.softmax(logits.double(), dim=1).numpy()
    hips = []
    for i in range(len(site.sides)):
        hip = {
            "hip": f"{site.patient_keys[i][:8]}-{site.sides[i]}",
            "side": str(site.sides[i]),
            "probabilities": dict(zip(STAGE_NAMES, probs[i].tolist(), strict=True)),
            "predicted_stage": STAGE_NAMES[int(probs[i].argmax())],
            "scope": SCOPE,
        }
        if "protocol" in attention:
            hip["protocol_attention"] = dict(
                zip(site.protocols, attention["protocol"][i].tolist(), strict=True)
            )
        hips.append(hip)
    if png is not None:
        plot_attention(site, probs, attention, png)
    return hips


def _forward(
    net: StagingNet, images: np.ndarray, available: np.ndarray, batch_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits ``(N, 4)`` and attention maps (``StagingNet`` shapes) of ``N`` hips, in batches."""
    logits, attention = [], {}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out, maps = net(
                torch.from_numpy(images[start : start + batch_size]),
                torch.from_numpy(available[start : start + batch_size]),
                return_attention=True,
            )
            logits.append(out.float())
            for key, value in maps.items():
                attention.setdefault(key, []).append(value.float())
    return torch.cat(logits), {k: torch.cat(v) for k, v in attention.items()}


def plot_attention(site: SiteData, probs: np.ndarray, attention: dict[str, torch.Tensor], png: Path) -> None:
    """Save a figure: per hip (row), each protocol's most-attended slice with the spatial attention
    overlaid (the middle slice and no overlay for the plain fusion), and the stage probabilities.

    Args:
        site: the study's hips (``images (N, P, K, H, W)``, ``available (N, P)``, ``sides``).
        probs: ``(N, 4)`` stage probabilities.
        attention: ``StagingNet`` attention maps (``slice (N, P, K)``, ``protocol (N, P)``,
            ``spatial (N, P, K, h, w)``), or empty.
        png: output file (parent folders are created).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_hips, n_protocols = site.images.shape[:2]
    fig, axes = plt.subplots(
        n_hips, n_protocols + 1, figsize=(2.2 * (n_protocols + 1), 2.4 * n_hips), squeeze=False
    )
    for i in range(n_hips):
        for p in range(n_protocols):
            ax = axes[i, p]
            ax.axis("off")
            if not site.available[i, p]:
                ax.set_title(f"{site.protocols[p]}\n(missing)", fontsize=8)
                continue
            k = int(attention["slice"][i, p].argmax()) if "slice" in attention else site.images.shape[2] // 2
            ax.imshow(site.images[i, p, k], cmap="gray")
            if "spatial" in attention:
                heat = attention["spatial"][i, p, k].numpy()
                ax.imshow(
                    heat,
                    cmap="jet",
                    alpha=0.35,
                    extent=(-0.5, site.images.shape[-1] - 0.5, site.images.shape[-2] - 0.5, -0.5),
                )
            weight = float(attention["protocol"][i, p]) if "protocol" in attention else float("nan")
            ax.set_title(f"{site.protocols[p]} slice {k}\nattention {weight:.2f}", fontsize=8)
        ax = axes[i, -1]
        ax.bar(STAGE_NAMES, probs[i], color="tab:blue")
        ax.set(ylim=(0, 1), title=f"{site.sides[i]} hip: stage {STAGE_NAMES[int(probs[i].argmax())]}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``onfh predict``: 0 on success, 2 on a user error (bad folder or model), with a message."""
    parser = argparse.ArgumentParser(prog="onfh predict", description=description(__doc__))
    parser.add_argument("study_dir", type=Path, help="folder with the study's DICOM (any structure)")
    parser.add_argument(
        "--model", type=Path, required=True, help="run folder with final_model.npz + run_config.json"
    )
    parser.add_argument(
        "--png", type=Path, default=Path("prediction.png"), help="where to save the attention figure"
    )
    args = parser.parse_args(argv)
    try:
        hips = predict_study(args.study_dir, args.model, args.png)
    except (ValueError, OSError) as exc:
        print(f"onfh predict: {exc}", file=sys.stderr)
        return 2
    print(SCOPE)
    for hip in hips:
        probs = "  ".join(f"{k}: {v:.3f}" for k, v in hip["probabilities"].items())
        print(f"hip {hip['hip']}: stage {hip['predicted_stage']} if ONFH   ({probs})")
        if "protocol_attention" in hip:
            weights = ", ".join(f"{k} {v:.3f}" for k, v in hip["protocol_attention"].items())
            print(f"    protocol attention: {weights}")
        else:
            print("    protocol attention: none (plain fusion model)")
    print(f"attention figure: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
