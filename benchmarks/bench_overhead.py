"""Overhead benchmark: what Flower's orchestration adds to a round, beside the same work without Flower.

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_overhead            # 4 sites x 30 patients, presets/default.toml
    .venv/bin/python -m benchmarks.bench_overhead --quick    # smoke: 2 sites x 6 patients, tiny, 1+1 rounds

**Round overhead.** The federation runs once in Flower's simulation runtime (Ray, one actor per
CPU, ``OMP_NUM_THREADS=1`` in each, as ``onfh simulate`` runs it); the server's strategy records
each round's wall-clock times (``server/accounting.py``: ``seconds.train``, ``.evaluate``,
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

Aggregation alone (Flower's FedAvg and ours vs a numpy mean) is ``benchmarks/bench_aggregation.py``.

Prints the tables and the headline last, and writes JSON (default
``benchmarks/results/overhead.json``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from benchmarks.harness import (
    add_federation_args,
    choose_federation,
    command,
    machine,
    markdown,
    max_abs_diff,
    pct,
    prepare_federation,
    quiet_progress,
    run_fresh,
    weighted_mean,
    write_json,
)


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


HEADER = [
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


def compare_round(phase: str, entry: dict, ref: dict, workers: int) -> tuple[dict, list]:
    """One round, Flower (the server's record ``entry``) vs the replay (``ref``): figures and table row."""
    s = entry.get("seconds", {})
    flower = s.get("round", float("nan"))
    site_seconds = list(entry.get("site-train-seconds", {}).values())
    # The sites' train_round calls cannot take less than this on `workers` parallel workers.
    makespan = max(max(site_seconds), sum(site_seconds) / workers) if site_seconds else 0.0
    item = {
        "phase": phase,
        "round": entry["round"],
        "flower": {
            k: s.get(k) for k in ("train", "train-wait", "aggregate", "evaluate", "round", "on-round-end")
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
    row = [
        phase,
        entry["round"],
        f"{flower:.2f} ({s.get('train', 0):.2f} / {s.get('evaluate', 0):.2f})",
        f"{ref['round-seconds']:.2f} ({ref['train']:.2f} / {ref['evaluate']:.2f})",
        f"{item['orchestration-seconds']:.2f} ({pct(item['orchestration-share'])})",
        f"{sum(site_seconds):.2f} / {sum(ref['site-train-seconds-reported'].values()):.2f}",
        f"{item['train-outside-sites-seconds']:.2f} ({pct(item['train-outside-sites-share'])})",
        f"{item['site-compute-sum']:.2f}",
        f"{s.get('on-round-end', 0):.2f}",
    ]
    return item, row


def _phase_shares(per_round: list[dict]) -> tuple[dict, dict]:
    """Per phase: orchestration share of the Flower rounds, and the same-run share outside the sites."""
    shares: dict[str, float | None] = {}
    in_run: dict[str, float | None] = {}
    for phase in ("pretrain", "stage"):
        items = [i for i in per_round if i["phase"] == phase]
        flower = sum(i["flower"]["round"] or 0 for i in items)
        replayed = sum(i["replay"]["round-seconds"] for i in items)
        shares[phase] = (flower - replayed) / flower if flower else None
        train = sum(i["flower"]["train"] or 0 for i in items)
        in_run[phase] = sum(i["train-outside-sites-seconds"] for i in items) / train if train else None
    return shares, in_run


def round_overhead(cfg, n_sites: int) -> dict:
    """The federation in Flower's runtime, then its replay without Flower; per-round comparison."""
    load_before = os.getloadavg()
    fed, fed_seconds = run_fresh(cfg, n_sites)
    load_between = os.getloadavg()
    print("the same rounds without Flower (process pool, 1 thread per worker)", flush=True)
    t0 = time.time()
    plain = replay(cfg, n_sites)
    replay_seconds = time.time() - t0
    rows, per_round = [], []
    for phase in ("pretrain", "stage"):
        for entry, ref in zip(fed["history"].get(phase, []), plain["rounds"][phase], strict=False):
            item, row = compare_round(phase, entry, ref, plain["workers"])
            per_round.append(item)
            rows.append(row)
    in_rounds = sum(
        (e.get("seconds", {}).get("round", 0) + e.get("seconds", {}).get("on-round-end", 0))
        for p in ("pretrain", "stage")
        for e in fed["history"].get(p, [])
    )
    checks = {
        phase: max_abs_diff(plain["weights"].get(phase, {}), _server_weights(cfg, phase))
        for phase in ("pretrain", "stage")
    }
    shares, in_run = _phase_shares(per_round)
    return {
        "table": {"header": HEADER, "rows": rows},
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


def report(r: dict, n_sites: int) -> str:
    """The round table and the headline, as printed."""
    print(
        f"\nA round in Flower's simulation runtime vs the same work without Flower "
        f"({n_sites} sites, {r['replay-workers']} workers of 1 thread both ways):\n"
    )
    print(markdown(r["table"]["header"], r["table"]["rows"]))
    print(
        f"\nFixed cost outside rounds (Ray start, inventory, transfer, final test, results, shutdown): "
        f"{r['flower-outside-rounds-seconds']:.1f} s of the {r['flower-run-seconds']:.1f} s run."
    )
    print(
        "Max |replay - server| weight difference: "
        + ", ".join(
            f"{p} {'-' if d is None else f'{d:.2e}'}"
            for p, d in r["max-abs-weight-difference-replay-vs-server"].items()
        )
    )
    return (
        "orchestration (Flower round minus the same work without Flower) is "
        + ", ".join(
            f"{pct(v)} of the {p} round time" for p, v in r["share-per-phase"].items() if v is not None
        )
        + " (same run, training step outside the sites' train_round: "
        + ", ".join(
            f"{pct(v)} {p}" for p, v in r["train-outside-sites-share-per-phase"].items() if v is not None
        )
        + ")"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke: 2 sites x 6 patients tiny, 1+1 rounds")
    add_federation_args(parser, "overhead.json")
    args = parser.parse_args(argv)
    quiet_progress()
    started = time.time()
    results: dict = {"command": command("bench_overhead", argv), **machine()}
    fed = choose_federation(args.quick, args.data, args.cache, args.config)
    # The replay keeps no site-local layers: every layer is averaged (fedbn off whatever the preset).
    cfg, site_dirs = prepare_federation(fed, args.work, args.seed, fedbn=False)
    cfg = cfg.replace(run_name="overhead")
    results["federation"] = {
        "data": str(fed.data),
        "sites": len(site_dirs),
        "patients": fed.patients,
        "size": fed.size,
    }
    results["preset"] = str(fed.preset)
    results["round"] = round_overhead(cfg, len(site_dirs))
    write_json(args.out, results)
    headline = report(results["round"], len(site_dirs))
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = time.time() - started
    write_json(args.out, results)
    print(f"\nheadline: {headline} (load average {results['load_average_start'][0]:.1f}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
