"""Poisoning: pooled test macro AUROC of each aggregation rule with poisoned sites, against its clean run.

One of four sites (and two of eight) attacks in the staging phase (phase 2) through a
benchmark-only ClientApp (``benchmarks/poisoned_client.py``; production code has no hook):
sign-flipped updates (``global - k (local - global)``, k = 3), updates scaled x10, updates trained
on shuffled labels, or a free-rider's unchanged model claiming 10,000 hips. Rules: FedAvg with the
update-norm bound (run config ``update-norm-factor``, 5 by default) and without it (0), FedMedian,
FedTrimmedAvg (``trimmed-beta`` 0.25), Krum, Multi-Krum and Bulyan (``num-malicious-sites`` = the
number of attackers; Bulyan only where ``n >= 4f + 3``).

Phase 1 (MR-to-CT pretraining) runs once per federation, clean; every staging run (clean or
poisoned) starts from its encoder, through the server's own resume path: the run folder gets the
shared ``pretrain_model.npz`` and a checkpoint "staging, round 0" holding the transferred weights.

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_poisoning --quick   # smoke: tiny hips, 2 rounds, fedavg + fedmedian
    .venv/bin/python -m benchmarks.bench_poisoning           # 4 x 30 (1 attacker), 8 x 15 (2 attackers)

Writes ``benchmarks/results/poisoning[_quick].json`` after every run (runs in it with the same
setup are kept: a cut run continues) and the figure ``docs/poisoning.png`` (quick: under ``--work``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from benchmarks.harness import (
    PRESETS,
    QUICK_BUDGET,
    WORK,
    Federation,
    RunLog,
    auroc,
    command,
    machine,
    markdown,
    prepare_federation,
    previous_runs,
)
from benchmarks.poisoned_client import Attack
from common.config import STRATEGIES, RunConfig

ATTACKS = ("sign-flip", "scale", "shuffled-labels", "free-rider")
# rule key -> (label, run-config overrides); "{f}" is the number of attackers of the federation
RULES = {
    "fedavg": ("FedAvg (norm bound 5x)", {"strategy": "fedavg"}),
    "fedavg-nobound": ("FedAvg, no norm bound", {"strategy": "fedavg", "update_norm_factor": 0.0}),
    "fedmedian": ("FedMedian", {"strategy": "fedmedian"}),
    "fedtrimmedavg": ("FedTrimmedAvg (beta 0.25)", {"strategy": "fedtrimmedavg", "trimmed_beta": 0.25}),
    "krum": ("Krum", {"strategy": "krum", "num_malicious_sites": "{f}"}),
    "multikrum": ("Multi-Krum", {"strategy": "multikrum", "num_malicious_sites": "{f}"}),
    "bulyan": ("Bulyan", {"strategy": "bulyan", "num_malicious_sites": "{f}"}),
}
FULL = {"4x30": (4, 30, ("site-00",)), "8x15": (8, 15, ("site-00", "site-01"))}
QUICK = {"4x6": (4, 6, ("site-00",))}
TARGET_POINTS = 2.0


def available_rules(requested: list[str]) -> tuple[list[str], list[str]]:
    """(rules this tree can run, rules it cannot yet: strategy or run-config key missing)."""
    known = {f.name for f in fields(RunConfig)}
    runnable, missing = [], []
    for key in requested:
        overrides = RULES[key][1]
        ok = overrides["strategy"] in STRATEGIES and all(k in known for k in overrides if k != "strategy")
        (runnable if ok else missing).append(key)
    return runnable, missing


def rule_problem(key: str, n_sites: int, attackers: int) -> str | None:
    """Why a rule cannot run at this size (Bulyan's ``n >= 4f + 3``), else None."""
    if key == "bulyan" and n_sites < 4 * attackers + 3:
        return f"Bulyan needs n >= 4f + 3 = {4 * attackers + 3} sites, here n = {n_sites}"
    return None


def run_simulated(cfg: RunConfig, n_sites: int, attack: Attack | None) -> dict:
    """Both phases as ``simulation.main_job.run_federated`` runs them, with the poisoned ClientApp."""
    from flwr.simulation import run_simulation

    from benchmarks.poisoned_client import make_poisoned_client_app
    from server.server_app import make_server_app
    from simulation.main_job import backend_config

    overrides = cfg.to_dict()
    run_simulation(
        server_app=make_server_app(overrides),
        client_app=make_poisoned_client_app(overrides, attack),
        num_supernodes=n_sites,
        backend_config=backend_config(n_sites),
    )
    path = cfg.run_dir / "results.json"
    if not path.exists():
        log = cfg.run_dir / "server.log"
        tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
        raise RuntimeError(f"no {path}: " + " | ".join(tail))
    return json.loads(path.read_text())


def pretrain_once(cfg: RunConfig, n_sites: int) -> Path:
    """Phase 1 of a federation, clean, with no staging round; reused while its settings match."""
    run_cfg = cfg.replace(run_name=f"pretrain-{cfg.run_name}", stage_rounds=0, resume=False)
    done = run_cfg.run_dir / "results.json"
    keys = ("seed", "split_seed", "data_root", "pretrain_rounds", "pretrain_epochs", "pretrain_max_pairs")
    if done.exists() and (run_cfg.run_dir / "pretrain_model.npz").exists():
        old = json.loads(done.read_text())["config"]
        if all(old.get(k.replace("_", "-")) == getattr(run_cfg, k) for k in keys):
            print(f"phase 1: reusing {run_cfg.run_dir}", flush=True)
            return run_cfg.run_dir
    if run_cfg.run_dir.exists():
        shutil.rmtree(run_cfg.run_dir)
    t0 = time.time()
    run_simulated(run_cfg, n_sites, None)
    print(f"phase 1: {time.time() - t0:.0f} s -> {run_cfg.run_dir}", flush=True)
    return run_cfg.run_dir


def seed_staging_run(run_dir: Path, pretrain_dir: Path, cfg: RunConfig) -> None:
    """A run folder that the server resumes at staging round 0 from the shared phase-1 encoder."""
    import torch

    from common.models.factory import build_staging
    from common.training.weights import get_shared_state
    from server.checkpoint import Checkpoint, write_checkpoint

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    shutil.copy(pretrain_dir / "pretrain_model.npz", run_dir / "pretrain_model.npz")
    net = build_staging(cfg.model)
    with np.load(pretrain_dir / "final_model.npz") as data:  # the transferred, untrained staging net
        net.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files})
    history = json.loads((pretrain_dir / "results.json").read_text())["history"]
    state = {"pretrain": history.get("pretrain", []), "stage": [], "failures": []}
    write_checkpoint(
        run_dir / "checkpoint.npz", Checkpoint("stage", 0, get_shared_state(net, cfg.fedbn), state)
    )


def staging_run(cfg: RunConfig, n_sites: int, pretrain_dir: Path, rule: str, attack: Attack | None) -> dict:
    """One staging run of ``rule`` under ``attack`` (None: clean); the record kept in the JSON."""
    seed_staging_run(cfg.run_dir, pretrain_dir, cfg)
    t0 = time.time()
    results = run_simulated(cfg.replace(resume=True), n_sites, attack)
    test = results["test"]
    actions: dict[str, dict[str, int]] = {}
    for f in results.get("failures", []):
        if f.get("phase") == "stage" and f.get("step") == "train":
            by_site = actions.setdefault(f.get("action", "rejected"), {})
            by_site[f["site"]] = by_site.get(f["site"], 0) + 1
    return {
        "pooled": auroc(test.get("macro-auroc")),
        "test_hips": int(test.get("n-hips", 0)),
        "sites": {n: auroc(v.get("macro-auroc")) for n, v in test.get("sites", {}).items()},
        "best_round": results["history"].get("best-stage-round"),
        "stage_train_actions": actions,
        "seconds": round(time.time() - t0, 1),
    }


def _drop(run: dict | None, clean: dict | None) -> float | None:
    """AUROC drop in points (100 x (clean - poisoned)); positive = worse than the clean run."""
    if not run or not clean or run.get("pooled") is None or clean.get("pooled") is None:
        return None
    return 100.0 * (clean["pooled"] - run["pooled"])


def _find(runs: list[dict], fed: str, rule: str, attack: str) -> dict | None:
    return next((r for r in runs if (r["federation"], r["rule"], r["attack"]) == (fed, rule, attack)), None)


def table(runs: list[dict], fed: str, attacks: list[str]) -> str:
    """Rows: rules; cells: pooled test macro AUROC (drop vs the rule's clean run, in points)."""
    rows = []
    for rule in [k for k in RULES if any(x["federation"] == fed and x["rule"] == k for x in runs)]:
        clean = _find(runs, fed, rule, "clean")
        if clean and clean.get("error"):
            rows.append([RULES[rule][0], f"n/a: {clean['error']}"] + ["-"] * len(attacks))
            continue
        cells = [RULES[rule][0], "-" if not clean or clean["pooled"] is None else f"{clean['pooled']:.3f}"]
        for attack in attacks:
            run = _find(runs, fed, rule, attack)
            drop = _drop(run, clean)
            if run and run.get("error"):
                cells.append("failed")
            else:
                cells.append("-" if drop is None else f"{run['pooled']:.3f} ({-drop:+.1f})")
        rows.append(cells)
    return markdown(["rule", "clean", *attacks], rows)


def verdict(runs: list[dict], fed: str, attacks: list[str]) -> list[str]:
    """Per attack: FedAvg's drop, the best robust rule's drop, and the 2-point target met or missed."""
    lines = []
    robust = [r for r in RULES if r not in ("fedavg", "fedavg-nobound")]
    for attack in attacks:
        avg = _drop(_find(runs, fed, "fedavg", attack), _find(runs, fed, "fedavg", "clean"))
        drops = {
            rule: d
            for rule in ["fedavg", *robust]
            if (d := _drop(_find(runs, fed, rule, attack), _find(runs, fed, rule, "clean"))) is not None
        }
        if not drops:
            continue
        best = min(drops, key=lambda r: drops[r])
        met = "met" if drops[best] <= TARGET_POINTS else "missed"
        avg_text = "-" if avg is None else f"{avg:+.1f}"
        lines.append(
            f"{attack}: FedAvg (bound on) drop {avg_text} points; best rule {RULES[best][0]} "
            f"{drops[best]:+.1f} points -> target (<= {TARGET_POINTS:g}) {met}"
        )
    return lines


def plot(runs: list[dict], feds: list[str], attacks: list[str], path: Path) -> None:
    """Grouped bars per federation: rule x attack, AUROC drop vs the rule's clean run (points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feds = [f for f in feds if any(r["federation"] == f for r in runs)]
    if not feds:
        return
    fig, axes = plt.subplots(len(feds), 1, figsize=(11, 3.6 * len(feds)), squeeze=False)
    width = 0.8 / len(attacks)
    for ax, fed in zip(axes[:, 0], feds, strict=True):
        rules = [
            r for r in RULES if _find(runs, fed, r, "clean") and not _find(runs, fed, r, "clean").get("error")
        ]
        x = np.arange(len(rules))
        for i, attack in enumerate(attacks):
            values = [_drop(_find(runs, fed, r, attack), _find(runs, fed, r, "clean")) for r in rules]
            heights = [np.nan if v is None else v for v in values]
            bars = ax.bar(x + (i - (len(attacks) - 1) / 2) * width, heights, width, label=attack)
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.axhline(TARGET_POINTS, color="r", ls="--", lw=1, label=f"target: drop <= {TARGET_POINTS:g}")
        ax.axhline(0, color="k", lw=0.5)
        n, _, attackers = FULL.get(fed) or QUICK[fed]
        ax.set(
            xticks=x,
            xticklabels=[RULES[r][0] for r in rules],
            ylabel="AUROC drop vs clean (points)",
            title=f"{fed.split('x')[0]} sites x {fed.split('x')[1]} patients, {len(attackers)} poisoned",
        )
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(results: dict, feds: list[str], attacks: list[str]) -> None:
    runs = results["runs"]
    results["tables"] = {f: table(runs, f, attacks) for f in feds if any(r["federation"] == f for r in runs)}
    results["verdict"] = {f: verdict(runs, f, attacks) for f in feds}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke: 4 tiny sites x 6 patients, 2 rounds of 1 epoch"
    )
    parser.add_argument(
        "--federations", nargs="+", default=None, help="of 4x30 8x15 (default both; quick 4x6)"
    )
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=None, help="default all (quick 2)")
    parser.add_argument(
        "--attacks", nargs="+", choices=[*ATTACKS, "free-rider-inventory"], default=list(ATTACKS)
    )
    parser.add_argument("--stage-rounds", type=int, default=None, help="default 4 (quick 2)")
    parser.add_argument("--flip-factor", type=float, default=3.0, help="k of the sign flip")
    parser.add_argument("--scale", type=float, default=10.0, help="factor of the scaled update")
    parser.add_argument("--claimed", type=int, default=10_000, help="the free-rider's num-examples")
    parser.add_argument(
        "--seed", type=int, default=11, help="synthetic federation and run seed (main job: 0)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON (default benchmarks/results/poisoning.json)"
    )
    parser.add_argument("--work", type=Path, default=WORK / "poisoning", help="run folders")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default docs/poisoning.png)")
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    args.federations = args.federations or list(QUICK if args.quick else FULL)
    args.rules = args.rules or (["fedavg", "fedmedian"] if args.quick else list(RULES))
    args.stage_rounds = args.stage_rounds or (2 if args.quick else 4)
    args.out = args.out or Path(f"benchmarks/results/poisoning{suffix}.json")
    args.plot = args.plot or (args.work / "poisoning_quick.png" if args.quick else Path("docs/poisoning.png"))
    return args


def unbounded_twin(runs: list[dict], fed: str, rule: str, attack: str) -> dict | None:
    """FedAvg without the norm bound where FedAvg with it excluded nothing: the same run, not repeated.

    The bound's only effect is to exclude updates, and runs are deterministic (fixed seeds per site
    and round), so the two runs are identical; the record says it was taken from the bounded run.
    """
    base = _find(runs, fed, "fedavg", attack) if rule == "fedavg-nobound" else None
    if not base or base.get("error") or "excluded" in base.get("stage_train_actions", {}):
        return None
    same = {k: v for k, v in base.items() if k not in ("federation", "rule", "attack")}
    return {**same, "seconds": 0.0, "same_as": "fedavg (the norm bound excluded no update)"}


def run_federation_set(args: argparse.Namespace, fed: str, rules: list[str], log: RunLog) -> None:
    """Phase 1 once, then the clean and poisoned staging runs of every rule on one federation."""
    n_sites, patients, attackers = (QUICK if args.quick else FULL)[fed]
    size, preset = ("tiny", PRESETS / "tiny.toml") if args.quick else ("default", PRESETS / "default.toml")
    tag = f"{fed}-tiny-s{args.seed}" if args.quick else f"{fed}-s{args.seed}"
    federation = Federation(
        n_sites, patients, size, preset,
        Path(f"/tmp/onfh-bench/fed-poison-{tag}"), Path(f"/tmp/onfh-bench/cache-poison-{tag}"),
    )  # fmt: skip
    budget = {**(QUICK_BUDGET if args.quick else {}), "stage_rounds": args.stage_rounds}
    cfg, _ = prepare_federation(federation, args.work, args.seed, **budget)
    # In the clear: the norm bound and the robust rules need each update, which secure aggregation
    # (on by default since this benchmark ran) hides from the server.
    cfg = cfg.replace(run_name=tag, secure_aggregation=False)
    pretrain_dir = pretrain_once(cfg, n_sites)
    for rule in rules:
        problem = rule_problem(rule, n_sites, len(attackers))
        for name in ["clean", *args.attacks]:
            if log.done(federation=fed, rule=rule, attack=name):
                continue
            key = {"federation": fed, "rule": rule, "attack": name}
            if problem:
                log.record({**key, "pooled": None, "error": problem}, f"{fed} {rule}: skipped ({problem})")
                break
            if (same := unbounded_twin(log.runs, fed, rule, name)) is not None:
                log.record(
                    {**key, **same}, f"{fed} {rule:<14} {name:<16} = fedavg's run (no update excluded)"
                )
                continue
            attack = None
            if name != "clean":
                attack = Attack(name, attackers, args.flip_factor, args.scale, args.claimed)
            overrides = {k: len(attackers) if v == "{f}" else v for k, v in RULES[rule][1].items()}
            run_cfg = cfg.replace(**overrides, run_name=f"{tag}-{rule}-{name}")
            try:
                record = staging_run(run_cfg, n_sites, pretrain_dir, rule, attack)
            except Exception as exc:  # a failed run is a result too; the others go on
                record = {"pooled": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            pooled = "-" if record["pooled"] is None else f"{record['pooled']:.3f}"
            extra = record.get("error") or record.get("stage_train_actions") or ""
            log.record({**key, **record}, f"{fed} {rule:<14} {name:<16} pooled AUROC {pooled} {extra}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rules, missing = available_rules(args.rules)
    if missing:
        print(f"not in this tree yet (strategy or run-config key missing): {', '.join(missing)}", flush=True)
    budget = {**(QUICK_BUDGET if args.quick else {}), "stage_rounds": args.stage_rounds}
    setup = {
        "quick": args.quick,
        "seed": args.seed,
        "budget": budget,
        "flip_factor": args.flip_factor,
        "scale": args.scale,
        "claimed": args.claimed,
    }
    info = machine()
    results = {
        "command": command("bench_poisoning", argv),
        "machine": info["machine"],
        "date": info["date"],
        "setup": setup,
        "runs": previous_runs(args.out, "setup", setup),
    }
    attacks = [
        a for a in [*ATTACKS, "free-rider-inventory"] if any(r["attack"] == a for r in results["runs"])
    ]
    attacks = list(dict.fromkeys([*attacks, *args.attacks]))
    feds = list(QUICK if args.quick else FULL)
    log = RunLog(args.out, results, lambda r: summarise(r, feds, attacks))
    for fed in args.federations:
        run_federation_set(args, fed, rules, log)
    summarise(results, feds, attacks)
    plot(results["runs"], feds, attacks, args.plot)
    for fed, text in results["tables"].items():
        print(f"\n{fed}: pooled test macro AUROC (change vs the rule's clean run, points)\n{text}")
        print("\n".join(results["verdict"].get(fed, [])))
    print(f"\n{time.time() - log.started:.0f} s -> {args.out}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
