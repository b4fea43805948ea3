"""What the server writes: per-round metrics, the results JSON, the final model, and plots.

Everything here is aggregate: site names, counts, metrics. No patient identifier reaches it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.config import STAGES  # noqa: E402
from common.files import save_npz_atomic, write_atomic  # noqa: E402
from server.tracking import open_tracker  # noqa: E402

log = logging.getLogger("onfh.server")
PHASES = ("pretrain", "stage")  # in the order a run goes through them


class RunRecorder:
    """Appends one JSON line per round and writes the final outputs of a run."""

    def __init__(self, run_dir: Path, run_config: dict, tracking: str = "none") -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = open_tracker(tracking, run_dir)
        (run_dir / "run_config.json").write_text(json.dumps(run_config, indent=2))
        self.metrics_path = run_dir / "metrics.jsonl"
        self.started = time.time()
        # The server's log beside its results (aggregates and site names only).
        self.log_handler = logging.FileHandler(run_dir / "server.log")
        self.log_handler.setLevel(logging.INFO)
        self.log_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        for name in ("onfh", "flwr"):
            logging.getLogger(name).addHandler(self.log_handler)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        for name in ("onfh", "flwr"):
            logging.getLogger(name).removeHandler(self.log_handler)
        self.log_handler.close()

    def resume_metrics(self, history: dict) -> None:
        """Make ``metrics.jsonl`` hold exactly one line per round of a resumed run's checkpoint.

        The line of a round is written after its checkpoint, so a kill between the two leaves it
        out (it is rebuilt here from the checkpoint's history); lines beyond the checkpoint (a kill
        inside a round, or a log written before its checkpoint) and repeated lines are dropped.
        """
        done = [(phase, entry) for phase in PHASES for entry in history.get(phase, [])]
        found: dict[tuple[str, int], str] = {}
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        for text in lines:
            try:
                line = json.loads(text)
                found.setdefault((str(line["phase"]), int(line["round"])), text)
            except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                continue
        kept, rebuilt = [], 0
        for phase, entry in done:
            text = found.get((phase, int(entry["round"])))
            if text is None:
                text, rebuilt = json.dumps(_jsonable(_metrics_line(phase, entry))), rebuilt + 1
            kept.append(text)
        if kept != lines:
            log.info(
                "metrics.jsonl: %d of %d lines kept, %d rebuilt from the checkpoint",
                len(kept) - rebuilt,
                len(lines),
                rebuilt,
            )
            write_atomic(self.metrics_path, "".join(t + "\n" for t in kept).encode())

    def round_done(self, phase: str, round_no: int, entry: dict) -> None:
        line = _metrics_line(phase, {"round": round_no, **entry})
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(_jsonable(line)) + "\n")
        if self.tracker is not None:
            self.tracker.round(phase, round_no, entry)
        ev = entry.get("evaluate", {})
        if phase == "stage":
            log.info(
                "[stage round %d] val macro AUROC %.3f (%d hips)",
                round_no,
                ev.get("macro-auroc", float("nan")),
                int(ev.get("num-examples", 0)),
            )
        else:
            log.info(
                "[pretrain round %d] val MAE %.1f HU, PSNR %.2f dB",
                round_no,
                ev.get("mae-hu", float("nan")),
                ev.get("psnr", float("nan")),
            )

    def write_final(self, results: dict, model_arrays: dict[str, np.ndarray]) -> Path:
        results = {**results, "wall-seconds": time.time() - self.started}
        path = self.run_dir / "results.json"
        write_atomic(path, json.dumps(_jsonable(results), indent=2).encode())
        save_npz_atomic(self.run_dir / "final_model.npz", model_arrays)
        if self.tracker is not None:
            self.tracker.final(results.get("test", {}))
        self._plots(results)
        return path

    def _plots(self, results: dict) -> None:
        rounds = results.get("history", {}).get("stage", [])
        if rounds:
            fig, ax = plt.subplots(1, 2, figsize=(10, 4))
            xs = [r["round"] for r in rounds]
            ax[0].plot(xs, [r.get("evaluate", {}).get("macro-auroc", np.nan) for r in rounds], "o-")
            ax[0].set(
                xlabel="round", ylabel="pooled macro AUROC (val)", title="Staging, federated", ylim=(0.4, 1.0)
            )
            ax[1].plot(xs, [r.get("train", {}).get("loss", np.nan) for r in rounds], "o-")
            ax[1].set(xlabel="round", ylabel="mean local training loss", title="Training loss")
            fig.tight_layout()
            fig.savefig(self.run_dir / "metrics_per_round.png", dpi=110)
            plt.close(fig)
        test = results.get("test", {})
        if "score-histogram" in test:
            plot_roc(np.asarray(test["score-histogram"]), self.run_dir / "roc_per_stage.png")
        if "confusion" in test:
            plot_confusion(np.asarray(test["confusion"]), self.run_dir / "confusion_matrix.png")


def _metrics_line(phase: str, entry: dict) -> dict:
    """One round's line of ``metrics.jsonl`` from its history entry (which holds ``round``)."""
    rest = {k: v for k, v in entry.items() if k != "round"}
    return {"phase": phase, "round": int(entry["round"]), "time": time.time(), **rest}


def roc_from_histogram(hist_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (FPR, TPR) of one class from its ``(2, bins)`` negative/positive histogram."""
    neg, pos = hist_class[0][::-1], hist_class[1][::-1]  # thresholds from high to low
    fpr = np.concatenate([[0.0], np.cumsum(neg) / max(neg.sum(), 1)])
    tpr = np.concatenate([[0.0], np.cumsum(pos) / max(pos.sum(), 1)])
    return fpr, tpr


def plot_roc(histogram: np.ndarray, path: Path) -> None:
    hist = histogram.reshape(len(STAGES), 2, -1)
    fig, ax = plt.subplots(figsize=(5, 5))
    for i in range(len(STAGES)):
        if hist[i, 1].sum() == 0 or hist[i, 0].sum() == 0:
            continue
        fpr, tpr = roc_from_histogram(hist[i])
        ax.plot(fpr, tpr, label=f"ARCO {'I II III IV'.split()[i]}")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Pooled ROC per stage (test)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, path: Path) -> None:
    matrix = confusion.reshape(len(STAGES), len(STAGES))
    names = ["I", "II", "III", "IV"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, int(v), ha="center", va="center")
    ax.set(
        xticks=range(4),
        yticks=range(4),
        xticklabels=names,
        yticklabels=names,
        xlabel="predicted stage",
        ylabel="true stage",
        title="Pooled confusion (test)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
