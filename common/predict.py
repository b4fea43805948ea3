"""``onfh predict STUDY_DIR --model RUN_DIR``: stage each hip of a study and show where the model looked.

Prints per-hip ARCO stage probabilities and the protocol attention weights, and saves a PNG
with, per hip, each protocol's most-attended slice overlaid with the spatial attention.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.models.factory import build_staging
from common.run_config import RunConfig
from common.site_data import load_site

STAGE_NAMES = ("I", "II", "III", "IV")


def load_model(run_dir: Path):
    """The staging network and run config saved by the federation or ``onfh train``."""
    config_path, model_path = run_dir / "run_config.json", run_dir / "final_model.npz"
    for path in (config_path, model_path):
        if not path.is_file():
            raise ValueError(
                f"{path} not found: --model must be a run folder written by 'onfh simulate' or 'onfh train'"
            )
    cfg = RunConfig.from_dict(json.loads(config_path.read_text()))
    net = build_staging(cfg.model)
    with np.load(model_path) as data:
        state = {k: torch.from_numpy(data[k]) for k in data.files}
    net.load_state_dict(state)
    return net.eval(), cfg


def predict_study(study_dir: Path, run_dir: Path, png: Path | None) -> list[dict]:
    net, cfg = load_model(run_dir)
    with tempfile.TemporaryDirectory() as cache:
        site = load_site(study_dir, Path(cache), cfg.preprocess)
    for line in site.problems.lines("warning"):
        print(line, file=sys.stderr)
    if len(site.sides) == 0:
        raise ValueError(f"no femoral head could be cropped from {study_dir}; run 'onfh check {study_dir}'")
    with torch.no_grad():
        logits, attention = net(
            torch.from_numpy(site.images), torch.from_numpy(site.available), return_attention=True
        )
    probs = torch.softmax(logits, dim=1).numpy()
    hips = []
    for i in range(len(site.sides)):
        hip = {
            "hip": f"{site.patient_keys[i][:8]}-{site.sides[i]}",
            "probabilities": dict(zip(STAGE_NAMES, probs[i].round(3).tolist(), strict=True)),
            "predicted_stage": STAGE_NAMES[int(probs[i].argmax())],
        }
        if "protocol" in attention:
            hip["protocol_attention"] = dict(
                zip(site.protocols, attention["protocol"][i].numpy().round(3).tolist(), strict=True)
            )
        hips.append(hip)
    if png is not None:
        plot_attention(site, probs, attention, png)
    return hips


def plot_attention(site, probs: np.ndarray, attention: dict, png: Path) -> None:
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
    parser = argparse.ArgumentParser(prog="onfh predict", description=__doc__.split("\n\n")[0])
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
    except ValueError as exc:
        print(f"onfh predict: {exc}", file=sys.stderr)
        return 2
    for hip in hips:
        probs = "  ".join(f"{k}: {v:.2f}" for k, v in hip["probabilities"].items())
        print(f"hip {hip['hip']}: stage {hip['predicted_stage']}   ({probs})")
        if "protocol_attention" in hip:
            print(
                "    protocol attention: "
                + ", ".join(f"{k} {v:.2f}" for k, v in hip["protocol_attention"].items())
            )
    print(f"attention figure: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
