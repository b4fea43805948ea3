"""What every benchmark script shares: the federation and its caches, runs, timing, tables and JSON."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "presets"
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

# The default federation the figures in docs/benchmarks.md were measured on, and the smoke one.
DEFAULT_DATA, DEFAULT_CACHE = Path("/tmp/fed_default"), Path("/tmp/cache_default")
TINY_DATA, TINY_CACHE = Path("/tmp/onfh-bench/fed-tiny"), Path("/tmp/onfh-bench/cache-tiny")
WORK = Path("/tmp/onfh-bench/runs")


@dataclass(frozen=True)
class Federation:
    """Which synthetic federation a benchmark runs on, and where it and its caches live."""

    sites: int
    patients: int
    size: str
    preset: Path
    data: Path
    cache: Path


def choose_federation(quick: bool, data: Path | None, cache: Path | None, config: Path | None) -> Federation:
    """The default federation (4 sites x 30 patients, presets/default.toml) or, with ``quick``,
    the smoke one (2 sites x 6 patients, tiny, presets/tiny.toml); folders and preset overridable."""
    if quick:
        return Federation(
            2, 6, "tiny", config or PRESETS / "tiny.toml", data or TINY_DATA, cache or TINY_CACHE
        )
    return Federation(
        4, 30, "default", config or PRESETS / "default.toml", data or DEFAULT_DATA, cache or DEFAULT_CACHE
    )


def add_federation_args(parser: argparse.ArgumentParser, out: str) -> None:
    """The options the federated benchmarks share: data, cache, run outputs, preset, seed, JSON."""
    parser.add_argument("--out", type=Path, default=Path(f"benchmarks/results/{out}"), help="JSON results")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"federation folder (default {DEFAULT_DATA}; quick: {TINY_DATA})",
    )
    parser.add_argument("--cache", type=Path, default=None, help=f"cache root (default {DEFAULT_CACHE})")
    parser.add_argument("--work", type=Path, default=WORK, help="run outputs")
    parser.add_argument("--config", type=Path, default=None, help="preset (default presets/default.toml)")
    parser.add_argument("--seed", type=int, default=0)


def quiet_progress() -> None:
    """Our own progress lines on stderr, Flower's own logger as it is (as ``onfh simulate`` does)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    onfh_log = logging.getLogger("onfh")
    if not onfh_log.handlers:
        onfh_log.addHandler(handler)
    onfh_log.setLevel(logging.INFO)
    onfh_log.propagate = False


def site_dirs(data: Path, limit: int | None = None) -> list[Path]:
    """The ``site-NN`` folders of a federation, in name order (the first ``limit`` of them)."""
    found = sorted(p for p in data.glob("site-*") if p.is_dir())
    return found[:limit] if limit is not None else found


def prepare_federation(fed: Federation, work: Path, seed: int, **overrides: Any):
    """Write (or reuse) the synthetic hospitals, fill every site's cache, return (config, site dirs).

    ``generate_federation`` reuses a folder that holds the same federation and regenerates one
    written by it with other parameters; preprocessing reuses a filled cache.
    """
    from common.config import load_run_config
    from simulation.main_job import preprocess_sites
    from simulation.synth.federation import generate_federation

    cfg = load_run_config(
        fed.preset,
        seed=seed,
        data_root=str(fed.data.resolve()),
        cache_dir=str(fed.cache.resolve()),
        output_dir=str(work.resolve()),
        resume=False,
        **overrides,
    )
    t0 = time.time()
    generate_federation(fed.data, sites=fed.sites, patients=fed.patients, seed=seed, size=fed.size)
    dirs = site_dirs(fed.data, fed.sites)
    print(f"federation {fed.data}: {len(dirs)} sites ready in {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()
    preprocess_sites(cfg, dirs)
    print(f"site caches {fed.cache}: ready in {time.time() - t0:.0f} s", flush=True)
    return cfg, dirs


def run_fresh(cfg, n_sites: int) -> tuple[dict, float]:
    """One federated run from scratch (its run folder emptied first); returns (results.json, seconds)."""
    from simulation.main_job import run_federated

    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)  # the recorder appends to metrics.jsonl: start clean
    t0 = time.time()
    results = run_federated(cfg, n_sites)
    return results, time.time() - t0


def delivered_federated(cfg, dirs: list[Path], split: str = "test"):
    """The models a federated run of ``cfg`` delivered to the sites, scored on their hips of ``split``
    (test unless told; ``simulation.comparison.Scored``). The run is made first unless its final
    model is there, so a cut benchmark continues where it stopped."""
    from simulation.comparison import delivered_scores
    from simulation.main_job import run_federated

    if not (cfg.run_dir / "final_model.npz").is_file():
        run_federated(cfg, len(dirs))
    scored = delivered_scores(cfg, dirs, split)
    if scored is None:
        raise SystemExit(
            f"no model of run {cfg.run_name} was delivered to the sites (looked beside {dirs[0]})"
        )
    return scored


def preset_overrides(path: Path) -> dict:
    """The run-config changes a preset file makes (keys as RunConfig fields)."""
    import tomllib

    return {k.replace("-", "_"): v for k, v in tomllib.loads(Path(path).read_text()).items()}


def markdown(header: list[str], rows: list[list]) -> str:
    """A Markdown table, cells as given."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict:
    """Machine, date and load average at the start: the context every figure is quoted with."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "date": date.today().isoformat(),
        "load_average_start": os.getloadavg(),
    }


def command(script: str, argv: list[str] | None) -> str:
    """The command line that produced a result file."""
    return f"python -m benchmarks.{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def write_json(path: Path, results: dict) -> None:
    """Write (or rewrite, after each step, so a cut run keeps what it measured) a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


def previous_runs(path: Path, key: str, value: Any) -> list[dict]:
    """Runs kept in ``path`` from an earlier call with the same ``key`` (setup), else none."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    return previous.get("runs", []) if previous.get(key) == value else []


def auroc(value) -> float | None:
    """A pooled AUROC, or None where it is undefined (NaN or -1: a test set with a single stage)."""
    return float(value) if isinstance(value, (int, float)) and value == value and value >= 0 else None


def mean_sd(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample SD over the finite values (NaN and 0 where there are none / one)."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return float("nan"), 0.0
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def weighted_mean(updates: list[dict[str, np.ndarray]], examples: list[float]) -> dict[str, np.ndarray]:
    """Example-weighted mean, accumulated in place (the arithmetic of Flower's FedAvg)."""
    total = float(sum(examples))
    out: dict[str, np.ndarray] = {}
    for arrays, n in zip(updates, examples, strict=True):
        for key, value in arrays.items():
            if key in out:
                out[key] += value * (n / total)
            else:
                out[key] = value * (n / total)
    return out


def max_abs_diff(a: dict, b: dict) -> float | None:
    """Largest absolute difference between two same-keyed weight dicts (None when they differ in keys)."""
    if not a or not b or set(a) != set(b):
        return None
    return float(max(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))) for k in a))


def pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f} %"


# A smoke budget for the scripts that train whole models: 1 round of 1 epoch per phase.
QUICK_BUDGET = {
    "pretrain_rounds": 1,
    "pretrain_epochs": 1,
    "pretrain_max_pairs": 200,
    "stage_rounds": 1,
    "stage_epochs": 1,
}


class RunLog:
    """The runs of a resumable benchmark: kept in its JSON file, which is rewritten after each run.

    ``update(results)`` refreshes derived figures (tables, summaries) before every write;
    ``defaults`` fill keys that runs of older files lack when ``done`` matches them.
    """

    def __init__(self, out: Path, results: dict, update, defaults: dict | None = None) -> None:
        self.out, self.results, self.update = out, results, update
        self.runs: list[dict] = results["runs"]
        self.defaults = defaults or {}
        self.started = time.time()

    def done(self, **keys: Any) -> bool:
        return any(all(r.get(k, self.defaults.get(k)) == v for k, v in keys.items()) for r in self.runs)

    def record(self, run: dict, line: str) -> None:
        self.runs.append(run)
        self.update(self.results)
        self.results["seconds"] = time.time() - self.started
        write_json(self.out, self.results)
        print(line, flush=True)
