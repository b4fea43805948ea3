"""Aggregation benchmark: what aggregating N sites' replies through a Flower strategy costs beside numpy.

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_aggregation            # N = 2, 4, 8, 16; three networks
    .venv/bin/python -m benchmarks.bench_aggregation --quick    # N = 2, 4; the cpu-small networks

For N sites (2, 4, 8, 16) and a model (cpu-small staging and translation
networks, vgg16 staging network), N replies are built as the client builds them (real Flower
``Message``/``ArrayRecord``; each site's weights = the model's + noise, float32, random example
counts) and aggregated three ways, each timed (median of repeats):

- ``numpy``: a plain example-weighted mean of the same numpy arrays (accumulated in place);
- ``Flower FedAvg``: ``flwr.serverapp.strategy.FedAvg.aggregate_train`` (deserializes each array,
  weighted sum, serializes the result);
- ``ours``: the server's strategy (``server.strategies.build_strategy``: validation of every reply,
  float32 re-record, byte accounting, then FedAvg).

Needs no federation (about 40 s). Prints the table and the headline last, and writes JSON (default
``benchmarks/results/aggregation.json``; figures before the split of this script from
``bench_overhead`` are in ``benchmarks/results/overhead.json``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import command, machine, markdown, max_abs_diff, weighted_mean, write_json

SITE_COUNTS = (2, 4, 8, 16)
MODELS = (("cpu-small", "staging"), ("cpu-small", "translation"), ("vgg16", "staging"))


def _replies(site_arrays: list[dict], examples: list[int]) -> list:
    """Train replies as client/client_app.py builds them, to instructions as the server sends them."""
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from common.records import to_record

    replies = []
    for i, (arrays, n) in enumerate(zip(site_arrays, examples, strict=True)):
        instruction = Message(
            RecordDict({"config": ConfigRecord({"phase": "stage"})}),
            dst_node_id=100 + i,
            message_type=MessageType.TRAIN,
        )
        content = RecordDict(
            {
                "metrics": MetricRecord({"num-examples": n, "loss": 0.5, "train-seconds": 1.0}),
                "site": ConfigRecord({"site-name": f"site-{i:02d}"}),
                "arrays": to_record(arrays),
            }
        )
        replies.append(Message(content=content, reply_to=instruction))
    return replies


def aggregation_case(preset: str, network: str, n_sites: int, repeats: int, seed: int = 0) -> dict:
    from flwr.serverapp.strategy import FedAvg

    from common.config import RunConfig
    from common.models.factory import build_staging, build_translation, count_parameters
    from common.training.weights import get_shared_state
    from server.strategies import build_strategy
    from server.strategy import PhaseState

    cfg = RunConfig(model_preset=preset)
    net = build_translation(cfg.model) if network == "translation" else build_staging(cfg.model)
    reference = get_shared_state(net, False)
    rng = np.random.default_rng(seed)
    site_arrays = [
        {k: v + 0.01 * rng.standard_normal(v.shape, dtype=np.float32) for k, v in reference.items()}
        for _ in range(n_sites)
    ]
    examples = [int(rng.integers(10, 100)) for _ in range(n_sites)]
    times: dict[str, list[float]] = {"numpy": [], "flower-fedavg": [], "ours": []}
    results: dict[str, dict] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        results["numpy"] = weighted_mean(site_arrays, examples)
        times["numpy"].append(time.perf_counter() - t0)

        replies = _replies(site_arrays, examples)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0)
        t0 = time.perf_counter()
        arrays, _ = strategy.aggregate_train(1, replies)
        times["flower-fedavg"].append(time.perf_counter() - t0)
        results["flower-fedavg"] = {k: v.numpy() for k, v in arrays.items()}
        del replies, arrays

        replies = _replies(site_arrays, examples)
        state = PhaseState("stage", sites={100 + i: f"site-{i:02d}" for i in range(n_sites)})
        ours = build_strategy(RunConfig(), state, reference)
        state.last_sent = [100 + i for i in range(n_sites)]
        t0 = time.perf_counter()
        arrays, _ = ours.aggregate_train(1, replies)
        times["ours"].append(time.perf_counter() - t0)
        results["ours"] = {k: v.numpy() for k, v in arrays.items()}
        del replies, arrays
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "preset": preset,
        "network": network,
        "sites": n_sites,
        "params": count_parameters(net),
        "fp32-bytes": int(sum(v.nbytes for v in reference.values())),
        "tensors": len(reference),
        "repeats": repeats,
        "seconds": median,
        "all-seconds": times,
        "flower-over-numpy": median["flower-fedavg"] / median["numpy"],
        "ours-over-numpy": median["ours"] / median["numpy"],
        "max-abs-difference-vs-numpy": {
            k: max_abs_diff(results[k], results["numpy"]) for k in ("flower-fedavg", "ours")
        },
    }


def aggregation(site_counts: tuple[int, ...], models: tuple, repeats: int) -> dict:
    from flwr.supercore.task_identity import TaskIdentity

    # What Flower's ServerApp runtime sets before a strategy creates messages (none runs here).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)  # one INFO line per aggregation otherwise
    cases = []
    for preset, network in models:
        for n in site_counts:
            case = aggregation_case(preset, network, n, repeats)
            cases.append(case)
            s = case["seconds"]
            print(
                f"aggregation {preset} {network} x {n} sites: numpy {1e3 * s['numpy']:.1f} ms, Flower FedAvg "
                f"{1e3 * s['flower-fedavg']:.1f} ms, ours {1e3 * s['ours']:.1f} ms",
                flush=True,
            )
    header = [
        "network",
        "params",
        "fp32 MB",
        "sites",
        "numpy mean ms",
        "Flower FedAvg ms",
        "Flower / numpy",
        "ours (validate + FedAvg) ms",
        "ours / numpy",
    ]
    rows = [
        [
            f"{c['preset']} {c['network']}",
            f"{c['params']:,}",
            f"{c['fp32-bytes'] / 1e6:.1f}",
            c["sites"],
            f"{1e3 * c['seconds']['numpy']:.1f}",
            f"{1e3 * c['seconds']['flower-fedavg']:.1f}",
            f"{c['flower-over-numpy']:.1f}",
            f"{1e3 * c['seconds']['ours']:.1f}",
            f"{c['ours-over-numpy']:.1f}",
        ]
        for c in cases
    ]
    return {"cases": cases, "table": {"header": header, "rows": rows}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke: N = 2, 4 and the cpu-small networks")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/aggregation.json"))
    parser.add_argument("--repeats", type=int, default=None, help="repeats per case (default 5; quick 3)")
    args = parser.parse_args(argv)
    started = time.time()
    results: dict = {"command": command("bench_aggregation", argv), **machine()}
    counts = (2, 4) if args.quick else SITE_COUNTS
    models = MODELS[:2] if args.quick else MODELS
    results["aggregation"] = agg = aggregation(counts, models, args.repeats or (3 if args.quick else 5))
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = time.time() - started
    write_json(args.out, results)
    print(
        "\nServer aggregation of N replies, median time (Flower FedAvg and ours vs a numpy weighted mean):\n"
    )
    print(markdown(agg["table"]["header"], agg["table"]["rows"]))
    big = max(agg["cases"], key=lambda c: (c["fp32-bytes"], c["sites"]))
    print(
        f"\nheadline: aggregating {big['sites']} x {big['preset']} {big['network']} "
        f"({big['fp32-bytes'] / 1e6:.1f} MB each) takes {1e3 * big['seconds']['ours']:.0f} ms through our "
        f"strategy, {1e3 * big['seconds']['flower-fedavg']:.0f} ms through Flower's FedAvg, "
        f"{1e3 * big['seconds']['numpy']:.0f} ms as a numpy mean ({big['ours-over-numpy']:.1f}x, "
        f"{big['flower-over-numpy']:.1f}x) (load average {results['load_average_start'][0]:.1f}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
