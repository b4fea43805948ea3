"""Secure aggregation (SecAgg+): what it costs per round in time and bytes, and that it changes nothing else.

One synthetic federation, the same seeds, FedAvg twice: ``secure-aggregation = false`` ("plain")
and ``true`` ("secure": the server sees only the sum of the sites' masked updates and evaluation
histograms; each round adds the keys, shares and unmask query steps, common/secagg.py). Both arms
give every site the same permissive policy file (``min-release-hips = 1``, the least a policy
accepts, ``max-release-bins = 1000``; written under ``--work``, passed as ``run_federated``'s
``site_policy``): with the built-in policy a plain site with fewer than 10 test hips withholds its
evaluation, and the plain arm would have no pooled AUROC to compare. Both arms run
without the median update-norm bound (``update-norm-factor = 0``: the server cannot see single
updates under secure aggregation), so the arms differ only by secure aggregation.

Per arm and phase, from results.json: median server seconds per round (``round``; its parts
``train-wait``, ``aggregate``, ``evaluate``, and ``keys+shares`` = ``train`` minus those two, the
time the secure session's first two steps take in configure_train), and median bytes per round
(tensor and message bytes, sent + received, summed over the sites) per step. The server tallies
bytes per step and site: where a round's two unmask steps (training, evaluation) share one key
(``secagg-unmask-sent``), the second replaces the first and they count as one; where they are
counted apart (``secagg-unmask-train-sent``, ``secagg-unmask-evaluate-sent``), both are summed. Also the pooled test
macro AUROC and the largest absolute difference between the arms' ``pretrain_model.npz`` and
``final_model.npz``: the masked sum is quantised (``secagg-clip-range`` over 32 bits), so one
round's aggregate agrees within about 1e-6; the next rounds' local training (AdamW, a fresh
optimiser each round) amplifies that, so compare with ``--pretrain-rounds 1 --stage-rounds 1``.

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_secagg --quick   # smoke: 2 tiny sites x 6 patients, 1+1 rounds
    .venv/bin/python -m benchmarks.bench_secagg           # 4 sites x 30 patients, reduced budget (BUDGET)
    .venv/bin/python -m benchmarks.bench_secagg --pretrain-rounds 1 --stage-rounds 1 \
        --out benchmarks/results/secagg_1round.json --plot /tmp/secagg_1round.png   # one round a phase

Writes ``benchmarks/results/secagg[_quick].json`` after every run (runs with the same setup are
kept: a cut run continues) and the figure ``docs/secagg.png`` (quick: under ``--work``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import (
    QUICK_BUDGET,
    RunLog,
    add_federation_args,
    auroc,
    choose_federation,
    command,
    machine,
    markdown,
    max_abs_diff,
    prepare_federation,
    previous_runs,
)

# presets/default.toml, shortened so one run takes minutes on 2 loaded cores (default: 2 + 8 rounds, ~15 min).
BUDGET = {"pretrain_rounds": 2, "pretrain_max_pairs": 250, "stage_rounds": 4, "stage_epochs": 1}
ARMS = {"strategy": "fedavg", "update_norm_factor": 0.0}
POLICY = "[limits]\nmin-release-hips = 1\nmax-release-bins = 1000\n"
STEPS = ("train", "evaluate", "secagg-keys", "secagg-shares", "secagg-unmask")
TIMES = ("round", "keys+shares", "train-wait", "aggregate", "evaluate")
MB = 1e6


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def per_round(history: list[dict]) -> dict:
    """Median seconds per round of each part, and median bytes per round of each step (both ways, all sites)."""
    seconds = {}
    for part in TIMES:
        values = []
        for e in history:
            s = e.get("seconds", {})
            if part == "keys+shares":
                values.append(s["train"] - s.get("train-wait", 0.0) - s.get("aggregate", 0.0))
            elif part in s:
                values.append(s[part])
        seconds[part] = _median(values)
    bytes_ = {}
    for kind in ("bytes", "message-bytes"):
        steps = {}
        for step in STEPS:  # secagg-unmask: also secagg-unmask-train-sent etc., where counted apart
            totals = [
                sum(
                    sum(per_site.values())
                    for key, per_site in e.get(kind, {}).items()
                    if key.rsplit("-", 1)[0] == step or (step == "secagg-unmask" and key.startswith(step))
                )
                for e in history
            ]
            steps[step] = _median(totals) or 0.0
        steps["total"] = sum(steps.values())
        bytes_[kind] = steps
    return {"rounds": len(history), "seconds": seconds, "bytes": bytes_}


def run_arm(cfg, n_sites: int, secure: bool, seed: int, policy: Path) -> dict:
    """One federated run from scratch, secure aggregation on or off; the figures the tables need."""
    from simulation.main_job import run_federated

    arm = "secure" if secure else "plain"
    run_cfg = cfg.replace(secure_aggregation=secure, seed=seed, run_name=f"{cfg.run_name}-{arm}-s{seed}")
    if run_cfg.run_dir.exists():
        shutil.rmtree(run_cfg.run_dir)  # the recorder appends to metrics.jsonl: start clean
    t0 = time.time()
    results = run_federated(run_cfg, n_sites, site_policy=policy)
    seconds = time.time() - t0
    test = results["test"]
    return {
        "seed": seed,
        "secure": secure,
        "run_dir": str(run_cfg.run_dir),
        "pooled": auroc(test.get("macro-auroc")),
        "test_hips": int(test.get("n-hips", 0)),
        "phases": {p: per_round(results["history"].get(p, [])) for p in ("pretrain", "stage")},
        "failures": len(results.get("failures", [])),
        "seconds": seconds,
    }


def _load(path: Path) -> dict:
    if not path.exists():
        return {}
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def model_diffs(runs: list[dict]) -> dict:
    """seed -> file -> max |plain - secure| over every tensor of the two arms' saved models."""
    out = {}
    for seed in sorted({r["seed"] for r in runs}):
        arms = {r["secure"]: Path(r["run_dir"]) for r in runs if r["seed"] == seed}
        if len(arms) == 2:
            out[str(seed)] = {
                name: max_abs_diff(_load(arms[False] / name), _load(arms[True] / name))
                for name in ("pretrain_model.npz", "final_model.npz")
            }
    return out


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _kb(value: float) -> str:
    return f"{value / 1e3:,.1f}"


def tables(runs: list[dict], diffs: dict) -> dict[str, str]:
    """Seconds per round, bytes per round (per step) and the outcome, plain vs secure (first seed)."""
    seed = min(r["seed"] for r in runs)
    arms = {r["secure"]: r for r in runs if r["seed"] == seed}
    names = [(False, "plain"), (True, "secure")]
    present = [(k, n) for k, n in names if k in arms]
    rows = [
        [f"{phase} ({arms[k]['phases'][phase]['rounds']} rounds)", name]
        + [_s(arms[k]["phases"][phase]["seconds"][t]) for t in TIMES]
        for phase in ("pretrain", "stage")
        for k, name in present
    ]
    seconds = markdown(["phase", "arm", *[f"{t} (s)" for t in TIMES]], rows)
    rows = []
    for phase in ("pretrain", "stage"):
        for step in (*STEPS, "total"):
            row = [phase, step]
            for k, _ in present:
                b = arms[k]["phases"][phase]["bytes"]
                row += [_kb(b["bytes"][step]), _kb(b["message-bytes"][step])]
            rows.append(row)
    header = ["phase", "step"] + [f"{n} {kind} (kB)" for _, n in present for kind in ("tensor", "message")]
    bytes_ = markdown(header, rows)
    d = diffs.get(str(seed), {})
    rows = [
        [
            name,
            "-" if arms[k]["pooled"] is None else f"{arms[k]['pooled']:.3f}",
            arms[k]["test_hips"],
            f"{arms[k]['seconds']:.0f}",
            arms[k]["failures"],
        ]
        for k, name in present
    ]
    outcome = markdown(["arm", "pooled test macro AUROC", "test hips", "run (s)", "failures"], rows)
    if d:
        outcome += "\n\n" + markdown(
            ["saved model", "max abs difference, plain vs secure"],
            [[name, "-" if v is None else f"{v:.2e}"] for name, v in d.items()],
        )
    return {"seconds": seconds, "bytes": bytes_, "outcome": outcome}


def plot(runs: list[dict], path: Path) -> None:
    """Median seconds per round by part (left) and message bytes per round by step (right, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = min(r["seed"] for r in runs)
    arms = [r for r in sorted(runs, key=lambda r: r["secure"]) if r["seed"] == seed]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width, phases = 0.38, ("pretrain", "stage")
    for i, r in enumerate(arms):
        arm, hatch, at = ("secure", "//", i - 0.5) if r["secure"] else ("plain", None, i - 0.5)
        bottom = np.zeros(2)
        for j, part in enumerate(TIMES[1:]):  # the parts of a round
            s = np.array([r["phases"][p]["seconds"][part] or 0.0 for p in phases])
            left.bar(
                np.arange(2) + at * width, s, width, bottom=bottom, color=f"C{j}", hatch=hatch,
                edgecolor="k", lw=0.5, label=part if r["secure"] else None,
            )  # fmt: skip
            bottom += s
        for k, phase in enumerate(phases):
            mb = [r["phases"][phase]["bytes"]["message-bytes"][step] / MB for step in STEPS]
            right.bar(
                np.arange(len(STEPS)) + (2 * k + i - 1.5) * 0.2, mb, 0.2, color=f"C{2 * k + i}",
                label=f"{phase}, {arm}",
            )  # fmt: skip
    left.set_xticks(np.arange(2), phases)
    left.set(ylabel="median seconds per round (server)", title="Time per round: plain | secure (hatched)")
    right.set_xticks(np.arange(len(STEPS)), STEPS, fontsize=8)
    right.set_yscale("log")
    right.set(ylabel="MB per round (message bytes, both ways, all sites)", title="Bytes per round by step")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke: 2 tiny sites x 6 patients, 1+1 rounds")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (default 0)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default docs/secagg.png)")
    parser.add_argument("--pretrain-rounds", type=int, default=None, help="override the budget's")
    parser.add_argument("--stage-rounds", type=int, default=None, help="override the budget's")
    add_federation_args(parser, "secagg.json")
    args = parser.parse_args(argv)
    if args.quick and args.out == Path("benchmarks/results/secagg.json"):
        args.out = Path("benchmarks/results/secagg_quick.json")
    args.work = args.work / "secagg"
    args.plot = args.plot or (args.work / "secagg_quick.png" if args.quick else Path("docs/secagg.png"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fed = choose_federation(args.quick, args.data, args.cache, args.config)
    tag = f"{fed.sites}x{fed.patients}-{fed.size}-s{args.seed}"
    rounds = {"pretrain_rounds": args.pretrain_rounds, "stage_rounds": args.stage_rounds}
    budget = {**(QUICK_BUDGET if args.quick else BUDGET), **ARMS}
    budget.update({k: v for k, v in rounds.items() if v is not None})
    setup = {"quick": args.quick, "federation": tag, "data": str(fed.data), "budget": budget}
    results = {"command": command("bench_secagg", argv), **machine(), "setup": setup}
    results["runs"] = previous_runs(args.out, "setup", setup)
    cfg, _ = prepare_federation(fed, args.work, args.seed, **budget)
    cfg = cfg.replace(run_name=f"{tag}-r{budget['pretrain_rounds']}-{budget['stage_rounds']}")
    policy = args.work / "permissive-policy.toml"
    policy.parent.mkdir(parents=True, exist_ok=True)
    policy.write_text(POLICY)

    def update(res: dict) -> None:
        res["model_max_abs_diff"] = model_diffs(res["runs"])
        res["tables"] = tables(res["runs"], res["model_max_abs_diff"])

    log = RunLog(args.out, results, update)
    for seed in args.seeds:
        for secure in (False, True):
            if log.done(seed=seed, secure=secure):
                continue
            run = run_arm(cfg, fed.sites, secure, seed, policy)
            pooled = "-" if run["pooled"] is None else f"{run['pooled']:.3f}"
            arm = "secure" if secure else "plain"
            log.record(run, f"seed {seed} {arm}: pooled AUROC {pooled}, {run['seconds']:.0f} s")
    update(results)
    plot(results["runs"], args.plot)
    t = results["tables"]
    print(f"\nSeconds per round ({tag}):\n{t['seconds']}\n\nBytes per round:\n{t['bytes']}\n\n{t['outcome']}")
    print(f"\n{time.time() - log.started:.0f} s -> {args.out}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
