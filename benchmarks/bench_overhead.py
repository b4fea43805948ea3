"""Overhead benchmark: what Flower's orchestration adds to a round, and what aggregation through a
Flower strategy costs beside plain numpy.

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_overhead            # 4 sites x 30 patients, presets/default.toml
    .venv/bin/python -m benchmarks.bench_overhead --quick    # smoke: 2 sites x 6 patients, tiny, 1+1 rounds
    .venv/bin/python -m benchmarks.bench_overhead --part aggregation   # part (b) only (no federation)

(a) **Round overhead.** The federation runs once in Flower's simulation runtime (Ray, one actor per
CPU, ``OMP_NUM_THREADS=1`` in each, as ``onfh simulate`` runs it); the server's strategy records
each round's wall-clock times (``server/strategy.py``: ``seconds.train``, ``.evaluate``,
``.round`` = configure_train to the end of aggregate_evaluate, and ``.on-round-end`` = metrics line
+ checkpoint). Then the *same work without Flower*: a plain Python loop that, round by round,
calls ``client/tasks.py``'s ``train_round`` for every site with the same global weights, run
config, data and per-round seed, aggregates with a numpy example-weighted mean (FedAvg, sites in
name order, as the server does), then calls ``evaluate_round`` on every site's validation split.
The site calls run as the simulation runs them: in a pool of min(CPUs, sites) spawned processes
with one torch thread each, data loaded into each worker before the first round (the server's
inventory query does the same in the Ray actors). The replay follows the federation's arithmetic
exactly, so its weights are compared with the server's (pretrained model and last global model).

    orchestration share = (Flower round - replay round) / Flower round

i.e. the time a round spends outside the sites' training/evaluation work and a numpy mean:
messaging, serialization, Ray scheduling, Flower's polling, our validation and accounting. Also
shown: the sum of the sites' compute (what one process would spend doing them one after another),
the sites' own ``train-seconds`` in both (so that compute that runs slower inside a Ray actor can be
told apart from messaging and scheduling), and the run's fixed costs outside rounds (Ray start,
inventory, final test, shutdown). Both sides run one after the other on a shared machine: compare
their load averages (in the JSON) before reading much into a small difference.

A cross-check from the Flower run alone (same run, same load): the training step's wall time minus
the least time the sites' own ``train_round`` calls (their reported ``train-seconds``) can take on
the workers, max(longest site, sum / workers). It is exact when every worker trains the same number
of equal sites, and overstates the overhead when the sites are unequal.

(b) **Aggregation.** For N sites (2, 4, 8, 16) and a model (cpu-small staging and translation
networks, vgg16 staging network), N replies are built as the client builds them (real Flower
``Message``/``ArrayRecord``; each site's weights = the model's + noise, float32, random example
counts) and aggregated three ways, each timed (median of repeats):

- ``numpy``: a plain example-weighted mean of the same numpy arrays (accumulated in place);
- ``Flower FedAvg``: ``flwr.serverapp.strategy.FedAvg.aggregate_train`` (deserializes each array,
  weighted sum, serializes the result);
- ``ours``: the server's strategy (``server.strategy.build_strategy``: validation of every reply,
  float32 re-record, byte accounting, then FedAvg).

Prints the tables and the headline last, and writes JSON (default
``benchmarks/results/overhead.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from benchmarks.bench_communication import (
    ROOT,
    machine,
    markdown,
    prepare_federation,
    quiet_progress,
    run_fresh,
)

SITE_COUNTS = (2, 4, 8, 16)
MODELS = (("cpu-small", "staging"), ("cpu-small", "translation"), ("vgg16", "staging"))


# -- (a) the same rounds without Flower ------------------------------------------------------------
def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # as Ray sets it in an actor with num_cpus=1
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("onfh").setLevel(logging.WARNING)
    # A Ray actor imports these when it unpickles the ClientApp, before the first message.
    import client.client_app  # noqa: F401
    import client.tasks  # noqa: F401


def _site(cfg_dict: dict, index: int):
    from common.config import RunConfig, SiteConfig

    cfg = RunConfig.from_dict(cfg_dict)
    return cfg, SiteConfig.from_node_config({"partition-id": index}, cfg)


def _inventory_job(cfg_dict: dict, index: int) -> dict:
    from client import tasks

    cfg, site = _site(cfg_dict, index)
    return tasks.inventory(site, cfg)


def _train_job(cfg_dict: dict, index: int, phase: str, phase_round: int, arrays: dict) -> tuple:
    from client import tasks

    cfg, site = _site(cfg_dict, index)
    t0 = time.perf_counter()
    out, metrics, _ = tasks.train_round(phase, site, cfg, arrays, phase_round, None)
    return site.site_name, out, metrics, time.perf_counter() - t0


def _evaluate_job(cfg_dict: dict, index: int, phase: str, arrays: dict) -> tuple:
    from client import tasks

    cfg, site = _site(cfg_dict, index)
    t0 = time.perf_counter()
    metrics = tasks.evaluate_round(phase, "val", site, cfg, arrays, None)
    return site.site_name, metrics, time.perf_counter() - t0


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


def replay(cfg, n_sites: int) -> dict:
    """Both phases as plain function calls on a process pool; times per round and the weights."""
    from common.models.factory import build_staging, build_translation
    from common.models.transfer import load_pretrained_encoder
    from common.training.device import seed_everything
    from common.training.weights import get_shared_state, set_shared_state

    # The server's initial weights, built in the server's order after the same seeding.
    seed_everything(cfg.seed)
    translation, staging = build_translation(cfg.model), build_staging(cfg.model)
    cfg_dict = cfg.to_dict()
    workers = min(os.cpu_count() or 1, n_sites)
    rounds: dict[str, list[dict]] = {"pretrain": [], "stage": []}
    weights: dict[str, dict] = {}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        t0 = time.perf_counter()
        list(pool.map(_inventory_job, [cfg_dict] * n_sites, range(n_sites)))
        warmup = time.perf_counter() - t0

        def run_phase(phase: str, arrays: dict, total: int) -> dict:
            for phase_round in range(1, total + 1):
                t0 = time.perf_counter()
                futures = [
                    pool.submit(_train_job, cfg_dict, i, phase, phase_round, arrays) for i in range(n_sites)
                ]
                done = sorted((f.result() for f in futures), key=lambda r: r[0])  # site name order
                t1 = time.perf_counter()
                kept = [(out, m) for _, out, m, _ in done if m["num-examples"] > 0]
                if kept:
                    arrays = weighted_mean([o for o, _ in kept], [float(m["num-examples"]) for _, m in kept])
                t2 = time.perf_counter()
                evals = [
                    f.result()
                    for f in [pool.submit(_evaluate_job, cfg_dict, i, phase, arrays) for i in range(n_sites)]
                ]
                t3 = time.perf_counter()
                rounds[phase].append(
                    {
                        "round": phase_round,
                        "train": t1 - t0,
                        "aggregate": t2 - t1,
                        "evaluate": t3 - t2,
                        "round-seconds": t3 - t0,
                        "site-train-seconds": {name: s for name, _, _, s in done},
                        "site-train-seconds-reported": {name: m["train-seconds"] for name, _, m, _ in done},
                        "site-evaluate-seconds": {name: s for name, _, s in evals},
                    }
                )
                print(
                    f"replay {phase} round {phase_round}: train {t1 - t0:.1f} s, evaluate {t3 - t2:.1f} s",
                    flush=True,
                )
            return arrays

        if cfg.pretrained and cfg.pretrain_rounds > 0:
            pretrained = run_phase("pretrain", get_shared_state(translation, cfg.fedbn), cfg.pretrain_rounds)
            weights["pretrain"] = pretrained
            set_shared_state(translation, pretrained)
            load_pretrained_encoder(staging, translation.state_dict())
        if cfg.stage_rounds > 0:
            weights["stage"] = run_phase("stage", get_shared_state(staging, cfg.fedbn), cfg.stage_rounds)
    return {"workers": workers, "warmup-seconds": warmup, "rounds": rounds, "weights": weights}


def _max_abs_diff(a: dict, b: dict) -> float | None:
    if not a or not b or set(a) != set(b):
        return None
    return float(max(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))) for k in a))


def round_overhead(cfg, n_sites: int) -> dict:
    load_before = os.getloadavg()
    fed, fed_seconds = run_fresh(cfg, n_sites)
    load_between = os.getloadavg()
    print("the same rounds without Flower (process pool, 1 thread per worker)", flush=True)
    t0 = time.time()
    plain = replay(cfg, n_sites)
    replay_seconds = time.time() - t0
    workers = plain["workers"]
    rows, per_round = [], []
    for phase in ("pretrain", "stage"):
        for entry, ref in zip(fed["history"].get(phase, []), plain["rounds"][phase], strict=False):
            s = entry.get("seconds", {})
            flower = s.get("round", float("nan"))
            site_seconds = list(entry.get("site-train-seconds", {}).values())
            # The sites' train_round calls cannot take less than this on `workers` parallel workers.
            makespan = max(max(site_seconds), sum(site_seconds) / workers) if site_seconds else 0.0
            item = {
                "phase": phase,
                "round": entry["round"],
                "flower": {
                    k: s.get(k)
                    for k in ("train", "train-wait", "aggregate", "evaluate", "round", "on-round-end")
                },
                "flower-site-train-seconds": entry.get("site-train-seconds", {}),
                "replay": {k: ref[k] for k in ("train", "aggregate", "evaluate", "round-seconds")},
                "replay-site-train-seconds": ref["site-train-seconds"],
                "replay-site-train-seconds-reported": ref["site-train-seconds-reported"],
                "site-compute-sum": sum(ref["site-train-seconds"].values())
                + sum(ref["site-evaluate-seconds"].values()),
                "flower-site-train-makespan-lower-bound": makespan,
            }
            item["orchestration-seconds"] = flower - ref["round-seconds"]
            item["orchestration-share"] = item["orchestration-seconds"] / flower if flower > 0 else None
            train = s.get("train", 0.0)
            item["train-outside-sites-seconds"] = train - makespan
            item["train-outside-sites-share"] = (train - makespan) / train if train > 0 else None
            per_round.append(item)
            rows.append(
                [
                    phase,
                    entry["round"],
                    f"{flower:.2f} ({s.get('train', 0):.2f} / {s.get('evaluate', 0):.2f})",
                    f"{ref['round-seconds']:.2f} ({ref['train']:.2f} / {ref['evaluate']:.2f})",
                    f"{item['orchestration-seconds']:.2f} ({_pct(item['orchestration-share'])})",
                    f"{sum(site_seconds):.2f} / {sum(ref['site-train-seconds-reported'].values()):.2f}",
                    f"{item['train-outside-sites-seconds']:.2f} ({_pct(item['train-outside-sites-share'])})",
                    f"{item['site-compute-sum']:.2f}",
                    f"{s.get('on-round-end', 0):.2f}",
                ]
            )
    header = [
        "phase",
        "round",
        "Flower round s (train / eval)",
        "without Flower round s (train / eval)",
        "orchestration s (share of the Flower round)",
        "sites' train_round s, sum: Flower run / without",
        "Flower train step outside the sites' train_round s (share), same run",
        "site compute one after another s",
        "checkpoint etc. after the round s",
    ]
    in_rounds = sum(
        (e.get("seconds", {}).get("round", 0) + e.get("seconds", {}).get("on-round-end", 0))
        for p in ("pretrain", "stage")
        for e in fed["history"].get(p, [])
    )
    checks = {
        phase: _max_abs_diff(plain["weights"].get(phase, {}), _server_weights(cfg, phase))
        for phase in ("pretrain", "stage")
    }
    shares: dict[str, float | None] = {}
    in_run: dict[str, float | None] = {}
    for phase in ("pretrain", "stage"):
        items = [i for i in per_round if i["phase"] == phase]
        flower = sum(i["flower"]["round"] or 0 for i in items)
        shares[phase] = (
            (flower - sum(i["replay"]["round-seconds"] for i in items)) / flower if flower else None
        )
        train = sum(i["flower"]["train"] or 0 for i in items)
        in_run[phase] = sum(i["train-outside-sites-seconds"] for i in items) / train if train else None
    return {
        "table": {"header": header, "rows": rows},
        "rounds": per_round,
        "share-per-phase": shares,
        "train-outside-sites-share-per-phase": in_run,
        "flower-run-seconds": fed_seconds,
        "flower-outside-rounds-seconds": fed_seconds - in_rounds,
        "replay-seconds": replay_seconds,
        "load-average": {
            "before-flower": load_before,
            "after-flower": load_between,
            "after-replay": os.getloadavg(),
        },
        "replay-workers": plain["workers"],
        "replay-warmup-seconds": plain["warmup-seconds"],
        "max-abs-weight-difference-replay-vs-server": checks,
        "run-dir": str(cfg.run_dir),
        "failures": fed.get("failures", []),
    }


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f} %"


def _server_weights(cfg, phase: str) -> dict:
    """What the server kept: the pretrained model, and the last round's global staging weights."""
    from server.checkpoint import read_checkpoint

    if phase == "pretrain":
        path = cfg.run_dir / "pretrain_model.npz"
        if not path.exists():
            return {}
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    checkpoint = read_checkpoint(cfg.run_dir / "checkpoint.npz")
    return dict(checkpoint.arrays) if checkpoint.phase == "stage" else {}


# -- (b) aggregation: Flower strategy vs numpy -----------------------------------------------------
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
    from server.strategy import PhaseState, build_strategy

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
        ours = build_strategy(RunConfig())
        state = PhaseState("stage", sites={100 + i: f"site-{i:02d}" for i in range(n_sites)})
        ours.guard(state, reference, 1, lambda *a: None)
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
            k: _max_abs_diff(results[k], results["numpy"]) for k in ("flower-fedavg", "ours")
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
    parser.add_argument(
        "--quick", action="store_true", help="smoke: 2 sites x 6 patients tiny; fewer aggregation cases"
    )
    parser.add_argument("--part", choices=("all", "round", "aggregation"), default="all")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.json"))
    parser.add_argument(
        "--data", type=Path, default=None, help="federation folder (default /tmp/fed_default)"
    )
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default /tmp/cache_default)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/onfh-bench/runs"), help="run outputs")
    parser.add_argument("--config", type=Path, default=None, help="preset (default presets/default.toml)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=None, help="aggregation repeats (default 5; quick 3)")
    args = parser.parse_args(argv)
    quiet_progress()
    started = time.time()
    results: dict = {
        "command": "python -m benchmarks.bench_overhead "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        **machine(),
    }
    lines: list[str] = []
    headline: list[str] = []
    if args.part in ("all", "round"):
        if args.quick:
            sites, patients, size, preset = 2, 6, "tiny", args.config or ROOT / "presets" / "tiny.toml"
            data = args.data or Path("/tmp/onfh-bench/fed-tiny")
            cache = args.cache or Path("/tmp/onfh-bench/cache-tiny")
        else:
            sites, patients, size, preset = 4, 30, "default", args.config or ROOT / "presets" / "default.toml"
            data = args.data or Path("/tmp/fed_default")
            cache = args.cache or Path("/tmp/cache_default")
        cfg, site_dirs = prepare_federation(data, cache, args.work, sites, patients, size, args.seed, preset)
        cfg = cfg.replace(run_name="overhead")
        if cfg.fedbn:
            print(
                "bench_overhead: the replay keeps no site-local layers; run it with fedbn = false",
                file=sys.stderr,
            )
            return 2
        results["federation"] = {
            "data": str(data),
            "sites": len(site_dirs),
            "patients": patients,
            "size": size,
        }
        results["preset"] = str(preset)
        results["round"] = round_overhead(cfg, len(site_dirs))
        r = results["round"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        lines += [
            f"\n(a) A round in Flower's simulation runtime vs the same work without Flower "
            f"({len(site_dirs)} sites, {r['replay-workers']} workers of 1 thread both ways):\n",
            markdown(r["table"]["header"], r["table"]["rows"]),
            f"\nFixed cost outside rounds (Ray start, inventory, transfer, final test, results, shutdown): "
            f"{r['flower-outside-rounds-seconds']:.1f} s of the {r['flower-run-seconds']:.1f} s run.",
            "Max |replay - server| weight difference: "
            + ", ".join(
                f"{p} {'-' if d is None else f'{d:.2e}'}"
                for p, d in r["max-abs-weight-difference-replay-vs-server"].items()
            ),
        ]
        share = r["share-per-phase"]
        in_run = r["train-outside-sites-share-per-phase"]
        headline.append(
            "orchestration (Flower round minus the same work without Flower) is "
            + ", ".join(f"{_pct(v)} of the {p} round time" for p, v in share.items() if v is not None)
            + " (same run, training step outside the sites' train_round: "
            + ", ".join(f"{_pct(v)} {p}" for p, v in in_run.items() if v is not None)
            + ")"
        )
    if args.part in ("all", "aggregation"):
        counts = (2, 4) if args.quick else SITE_COUNTS
        models = MODELS[:2] if args.quick else MODELS
        results["aggregation"] = aggregation(counts, models, args.repeats or (3 if args.quick else 5))
        agg = results["aggregation"]
        lines += [
            "\n(b) Server aggregation of N replies, median time (Flower FedAvg and ours vs a numpy weighted mean):\n",
            markdown(agg["table"]["header"], agg["table"]["rows"]),
        ]
        big = max(agg["cases"], key=lambda c: (c["fp32-bytes"], c["sites"]))
        headline.append(
            f"aggregating {big['sites']} x {big['preset']} {big['network']} ({big['fp32-bytes'] / 1e6:.1f} MB each) "
            f"takes {1e3 * big['seconds']['ours']:.0f} ms through our strategy, {1e3 * big['seconds']['flower-fedavg']:.0f} ms "
            f"through Flower's FedAvg, {1e3 * big['seconds']['numpy']:.0f} ms as a numpy mean "
            f"({big['ours-over-numpy']:.1f}x, {big['flower-over-numpy']:.1f}x)"
        )
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    print(
        f"\nheadline: {'; '.join(headline)} (load average {results['load_average_start'][0]:.1f}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
