"""Communication benchmark: bytes per site per round in each phase, float32 vs float16 updates.

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_communication            # 4 sites x 30 patients, presets/default.toml
    .venv/bin/python -m benchmarks.bench_communication --quick    # smoke: 2 sites x 6 patients, tiny, 1+1 rounds

What it measures: the federation (Flower simulation runtime, no centralized baselines) runs twice
on the same synthetic hospitals with the same seed, once with ``update-dtype = "float32"`` and once
with ``"float16"`` (sites send their weights in float16; the server casts them back to float32
before aggregating). The bytes are those of the actual messages, counted by the server's strategy
(``server/strategy.py``) per round and site into ``results.json``:

- **tensor bytes**: the sum of the ``nbytes`` of the arrays in a message's ArrayRecord, in the
  dtype they travel in (a reply is counted before the server's float32 cast);
- **record bytes**: Flower's ``count_bytes()`` of all the message's records (tensors with their
  numpy headers and names, metrics such as the evaluation histograms, config).

Both are payload sizes: gRPC/protobuf framing and Flower's message metadata come on top (in the
simulation runtime messages stay in memory). Each figure is stated against the fp32 size of the
exchanged state (every shared tensor in float32: the model as a site would send it in float32).
Phases: ``pretrain`` = MR-to-CT translation network, ``stage`` = staging network. Directions are
seen from the server: "server->site" (global weights sent out for training or evaluation) and
"site->server" (training updates; evaluation replies carry metrics only).

It also reports the pooled test macro AUROC of both runs and their difference: what float16
updates cost in accuracy on this data (one seed; a single run's AUROC on a few dozen test hips
moves by about 0.01 per misordered pair, so a difference of that size is noise).

Prints the tables and the headline last, and writes JSON (default
``benchmarks/results/communication.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

MB = 1e6
STEPS = ("train-sent", "train-received", "evaluate-sent", "evaluate-received")


# -- shared with bench_overhead and bench_scale ------------------------------------------------
def quiet_progress() -> None:
    """Our own progress lines on stderr, Flower's own logger as it is (as ``onfh simulate`` does)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    onfh_log = logging.getLogger("onfh")
    if not onfh_log.handlers:
        onfh_log.addHandler(handler)
    onfh_log.setLevel(logging.INFO)
    onfh_log.propagate = False


def prepare_federation(
    data: Path,
    cache: Path,
    work: Path,
    sites: int,
    patients: int,
    size: str,
    seed: int,
    preset: Path,
    **overrides,
):
    """Write (or reuse) the synthetic hospitals, fill every site's cache, return (config, site dirs).

    ``generate_federation`` reuses a folder that holds the same federation and regenerates one
    written by it with other parameters; preprocessing reuses a filled cache.
    """
    from common.training.centralized import load_run_config
    from simulation.main_job import preprocess_sites
    from simulation.synth import generate_federation

    cfg = load_run_config(
        preset,
        seed=seed,
        data_root=str(data.resolve()),
        cache_dir=str(cache.resolve()),
        output_dir=str(work.resolve()),
        resume=False,
        **overrides,
    )
    t0 = time.time()
    generate_federation(data, sites=sites, patients=patients, seed=seed, size=size)
    site_dirs = sorted(p for p in data.iterdir() if p.is_dir() and p.name.startswith("site-"))[:sites]
    print(f"federation {data}: {len(site_dirs)} sites ready in {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()
    preprocess_sites(cfg, site_dirs)
    print(f"site caches {cache}: ready in {time.time() - t0:.0f} s", flush=True)
    return cfg, site_dirs


def run_fresh(cfg, n_sites: int) -> tuple[dict, float]:
    """One federated run from scratch (its run folder emptied first); returns (results.json, seconds)."""
    from simulation.main_job import run_federated

    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)  # the recorder appends to metrics.jsonl: start clean
    t0 = time.time()
    results = run_federated(cfg, n_sites)
    return results, time.time() - t0


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict:
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "date": date.today().isoformat(),
        "load_average_start": os.getloadavg(),
    }


def auroc(value) -> float | None:
    """A pooled AUROC, or None where it is undefined (NaN: a test set with a single stage)."""
    return float(value) if isinstance(value, (int, float)) and value == value and value >= 0 else None


# -- this benchmark --------------------------------------------------------------------------------
def fp32_model_bytes(cfg) -> dict[str, int]:
    """Bytes of the exchanged state of each network with every tensor in float32."""
    from common.models.factory import build_staging, build_translation
    from common.training.weights import get_shared_state

    return {
        phase: int(sum(v.nbytes for v in get_shared_state(build(cfg.model), cfg.fedbn, "float32").values()))
        for phase, build in (("pretrain", build_translation), ("stage", build_staging))
    }


def per_site_bytes(results: dict) -> dict:
    """phase -> site -> step -> list over rounds of (tensor bytes, record bytes), from results.json."""
    out: dict = {}
    for phase in ("pretrain", "stage"):
        for entry in results["history"].get(phase, []):
            tensors, records = entry.get("bytes", {}), entry.get("message-bytes", {})
            for step in STEPS:
                for site, n in tensors.get(step, {}).items():
                    rec = records.get(step, {}).get(site, 0)
                    out.setdefault(phase, {}).setdefault(site, {}).setdefault(step, []).append(
                        (int(n), int(rec))
                    )
    return out


def total_per_site(results: dict) -> dict[str, int]:
    """Tensor bytes both ways over the whole run (both phases, every round), per site."""
    totals: dict[str, int] = {}
    for phase_sites in per_site_bytes(results).values():
        for site, steps in phase_sites.items():
            totals[site] = totals.get(site, 0) + sum(t for values in steps.values() for t, _ in values)
    return dict(sorted(totals.items()))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarise_run(results: dict, model_bytes: dict[str, int]) -> dict:
    """Per phase and site: mean bytes per round of each step, and how far rounds differ."""
    summary: dict = {}
    for phase, sites in per_site_bytes(results).items():
        for site, steps in sorted(sites.items()):
            row = {"rounds": max(len(v) for v in steps.values())}
            for step, values in steps.items():
                tensors = [t for t, _ in values]
                row[step] = _mean(tensors)
                row[f"{step}-records"] = _mean([r for _, r in values])
                row[f"{step}-varies"] = min(tensors) != max(tensors)
            sent = row.get("train-sent", 0) + row.get("evaluate-sent", 0)
            received = row.get("train-received", 0) + row.get("evaluate-received", 0)
            row["sent-per-round"] = sent
            row["received-per-round"] = received
            row["received-records-per-round"] = row.get("train-received-records", 0) + row.get(
                "evaluate-received-records", 0
            )
            row["train-received-over-fp32"] = row.get("train-received", 0) / model_bytes[phase]
            row["train-sent-over-fp32"] = row.get("train-sent", 0) / model_bytes[phase]
            summary.setdefault(phase, {})[site] = row
    return summary


def bytes_table(runs: dict, model_bytes: dict[str, int]) -> tuple[list[str], list[list]]:
    header = [
        "update dtype",
        "phase",
        "site",
        "rounds",
        "train: server->site MB",
        "train: site->server MB",
        "site->server / fp32 model",
        "eval: server->site MB",
        "eval: site->server kB (metrics, records)",
        "tensors per round, both ways MB",
    ]
    rows = []
    for dtype, run in runs.items():
        for phase in ("pretrain", "stage"):
            for site, r in run["bytes"].get(phase, {}).items():

                def mb(step: str, r: dict = r) -> str:
                    return f"{r.get(step, 0) / MB:.3f}" + ("*" if r.get(f"{step}-varies") else "")

                rows.append(
                    [
                        dtype,
                        phase,
                        site,
                        r["rounds"],
                        mb("train-sent"),
                        mb("train-received"),
                        f"{r['train-received-over-fp32']:.3f}",
                        mb("evaluate-sent"),
                        f"{r.get('evaluate-received-records', 0) / 1e3:.1f}",
                        f"{(r['sent-per-round'] + r['received-per-round']) / MB:.3f}",
                    ]
                )
    return header, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke: 2 sites x 6 patients, tiny, presets/tiny.toml"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/communication.json"))
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="federation folder (default /tmp/fed_default; quick: /tmp/onfh-bench/fed-tiny)",
    )
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default /tmp/cache_default)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/onfh-bench/runs"), help="run outputs")
    parser.add_argument("--config", type=Path, default=None, help="preset (default presets/default.toml)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quiet_progress()
    started = time.time()
    if args.quick:
        sites, patients, size, preset = 2, 6, "tiny", args.config or ROOT / "presets" / "tiny.toml"
        data = args.data or Path("/tmp/onfh-bench/fed-tiny")
        cache = args.cache or Path("/tmp/onfh-bench/cache-tiny")
    else:
        sites, patients, size, preset = 4, 30, "default", args.config or ROOT / "presets" / "default.toml"
        data = args.data or Path("/tmp/fed_default")
        cache = args.cache or Path("/tmp/cache_default")
    cfg, site_dirs = prepare_federation(data, cache, args.work, sites, patients, size, args.seed, preset)
    model_bytes = fp32_model_bytes(cfg)
    results: dict = {
        "command": "python -m benchmarks.bench_communication "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        **machine(),
        "federation": {
            "data": str(data),
            "sites": len(site_dirs),
            "patients": patients,
            "size": size,
            "seed": args.seed,
        },
        "preset": str(preset),
        "config": {
            k: cfg.to_dict()[k]
            for k in ("strategy", "model-preset", "pretrain-rounds", "stage-rounds", "hip-slices", "hip-size")
        },
        "fp32-model-bytes": model_bytes,
        "method": "tensor bytes = sum of array nbytes in each message's ArrayRecord as sent (replies before the "
        "server's float32 cast); record bytes = Flower count_bytes() of all records of the message; counted by "
        "server/strategy.py per round and site",
        "runs": {},
    }
    for dtype in ("float32", "float16"):
        run_cfg = cfg.replace(update_dtype=dtype, run_name=f"communication-{dtype}")
        print(f"federated run with update-dtype {dtype} -> {run_cfg.run_dir}", flush=True)
        fed, seconds = run_fresh(run_cfg, len(site_dirs))
        test = fed.get("test", {})
        results["runs"][dtype] = {
            "seconds": seconds,
            "run-dir": str(run_cfg.run_dir),
            "test-macro-auroc": auroc(test.get("macro-auroc")),
            "test-hips": int(test.get("n-hips", 0)),
            "test-accuracy": test.get("accuracy"),
            "failures": fed.get("failures", []),
            "bytes": summarise_run(fed, model_bytes),
            "total-tensor-bytes-per-site": total_per_site(fed),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    header, rows = bytes_table(results["runs"], model_bytes)
    f32, f16 = results["runs"]["float32"], results["runs"]["float16"]
    a32, a16 = f32["test-macro-auroc"], f16["test-macro-auroc"]
    cost = None if a32 is None or a16 is None else a16 - a32
    results["auroc"] = {
        "float32": a32,
        "float16": a16,
        "float16-minus-float32": cost,
        "test-hips": f32["test-hips"],
    }
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = time.time() - started

    def fmt(v: float | None) -> str:
        return "undefined (single-stage test set)" if v is None else f"{v:.3f}"

    print(
        "\nFP32 size of the exchanged state: "
        + ", ".join(f"{p} {b / MB:.3f} MB" for p, b in model_bytes.items())
    )
    print("\nBytes per site per round (tensor bytes; * = differs between rounds, mean shown):\n")
    print(markdown(header, rows))
    for dtype, run in results["runs"].items():
        totals = run["total-tensor-bytes-per-site"]
        print(
            f"whole run, {dtype}: tensors both ways per site "
            + ", ".join(f"{site} {n / MB:.1f} MB" for site, n in totals.items())
        )
    auroc_rows = [
        ["float32", fmt(a32), f32["test-hips"], f"{f32['seconds']:.0f}"],
        ["float16", fmt(a16), f16["test-hips"], f"{f16['seconds']:.0f}"],
        ["float16 - float32", "-" if cost is None else f"{cost:+.3f}", "", ""],
    ]
    print("\nPooled test macro AUROC:\n")
    print(markdown(["update dtype", "pooled test macro AUROC", "test hips", "run s"], auroc_rows))
    results["tables"] = {"bytes": {"header": header, "rows": rows}, "auroc": auroc_rows}
    args.out.write_text(json.dumps(results, indent=2))

    def up(run: dict, phase: str) -> float:
        rows_ = run["bytes"].get(phase, {}).values()
        return _mean([r["train-received"] for r in rows_])

    print(
        f"\nheadline: float16 updates cut what a site sends per staging round from {up(f32, 'stage') / MB:.2f} MB "
        f"to {up(f16, 'stage') / MB:.2f} MB ({up(f16, 'stage') / model_bytes['stage']:.2f} x the fp32 model; "
        f"pretraining {up(f32, 'pretrain') / MB:.2f} -> {up(f16, 'pretrain') / MB:.2f} MB), what it receives "
        f"stays fp32; pooled test macro AUROC {fmt(a32)} (float32) vs {fmt(a16)} (float16)"
        + ("" if cost is None else f", difference {cost:+.3f}")
        + f" ({f32['test-hips']} test hips) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
