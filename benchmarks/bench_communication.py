"""Communication benchmark: bytes per site per round in each phase, float32 vs float16 updates.

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_communication            # 4 sites x 30 patients, presets/default.toml
    .venv/bin/python -m benchmarks.bench_communication --quick    # smoke: 2 sites x 6 patients, tiny, 1+1 rounds

What it measures: the federation (Flower simulation runtime, no centralized baselines) runs twice
on the same synthetic hospitals with the same seed, once with ``update-dtype = "float32"`` and once
with ``"float16"`` (sites send their weights in float16; the server casts them back to float32
before aggregating). The bytes are those of the actual messages, counted by the server's strategy
(``server/accounting.py``) per round and site into ``results.json``:

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
import os
import sys
import time
from pathlib import Path

from benchmarks.harness import (
    add_federation_args,
    auroc,
    choose_federation,
    command,
    machine,
    markdown,
    prepare_federation,
    quiet_progress,
    run_fresh,
    write_json,
)

MB = 1e6
STEPS = ("train-sent", "train-received", "evaluate-sent", "evaluate-received")


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


def run_both(cfg, site_dirs: list[Path], results: dict, out: Path) -> None:
    """The federation once with float32 and once with float16 updates, into ``results["runs"]``."""
    model_bytes = results["fp32-model-bytes"]
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
        write_json(out, results)


def _fmt(v: float | None) -> str:
    return "undefined (single-stage test set)" if v is None else f"{v:.3f}"


def report(results: dict, out: Path) -> None:
    """Print the tables and the headline; add the tables and the AUROC cost to ``results``."""
    model_bytes = results["fp32-model-bytes"]
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
        ["float32", _fmt(a32), f32["test-hips"], f"{f32['seconds']:.0f}"],
        ["float16", _fmt(a16), f16["test-hips"], f"{f16['seconds']:.0f}"],
        ["float16 - float32", "-" if cost is None else f"{cost:+.3f}", "", ""],
    ]
    print("\nPooled test macro AUROC:\n")
    print(markdown(["update dtype", "pooled test macro AUROC", "test hips", "run s"], auroc_rows))
    results["tables"] = {"bytes": {"header": header, "rows": rows}, "auroc": auroc_rows}
    write_json(out, results)

    def up(run: dict, phase: str) -> float:
        return _mean([r["train-received"] for r in run["bytes"].get(phase, {}).values()])

    print(
        f"\nheadline: float16 updates cut what a site sends per staging round from {up(f32, 'stage') / MB:.2f} MB "
        f"to {up(f16, 'stage') / MB:.2f} MB ({up(f16, 'stage') / model_bytes['stage']:.2f} x the fp32 model; "
        f"pretraining {up(f32, 'pretrain') / MB:.2f} -> {up(f16, 'pretrain') / MB:.2f} MB), what it receives "
        f"stays fp32; pooled test macro AUROC {_fmt(a32)} (float32) vs {_fmt(a16)} (float16)"
        + ("" if cost is None else f", difference {cost:+.3f}")
        + f" ({f32['test-hips']} test hips) -> {out}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke: 2 sites x 6 patients, tiny, presets/tiny.toml"
    )
    add_federation_args(parser, "communication.json")
    args = parser.parse_args(argv)
    quiet_progress()
    started = time.time()
    fed = choose_federation(args.quick, args.data, args.cache, args.config)
    cfg, site_dirs = prepare_federation(fed, args.work, args.seed)
    results: dict = {
        "command": command("bench_communication", argv),
        **machine(),
        "federation": {
            "data": str(fed.data),
            "sites": len(site_dirs),
            "patients": fed.patients,
            "size": fed.size,
            "seed": args.seed,
        },
        "preset": str(fed.preset),
        "config": {
            k: cfg.to_dict()[k]
            for k in ("strategy", "model-preset", "pretrain-rounds", "stage-rounds", "hip-slices", "hip-size")
        },
        "fp32-model-bytes": fp32_model_bytes(cfg),
        "method": "tensor bytes = sum of array nbytes in each message's ArrayRecord as sent (replies before the "
        "server's float32 cast); record bytes = Flower count_bytes() of all records of the message; counted by "
        "server/accounting.py per round and site",
        "runs": {},
    }
    run_both(cfg, site_dirs, results, args.out)
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = time.time() - started
    report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
