"""Differential privacy: pooled test macro AUROC against epsilon, FedAvg without DP and with DP.

One synthetic federation, one budget (``presets/default.toml`` shortened to ``BUDGET``: 2
pretraining rounds of 250 pairs, 4 staging rounds of 2 epochs, so a run takes minutes on 2 loaded
cores), the same seeds; FedAvg without DP, then with site-level DP (``server/privacy.py``) on both
phases at each noise multiplier ``z`` (``--multipliers``), every update clipped to ``--clip`` (run
config ``dp-clip-norm``). Epsilon is the run's, both phases composed, at ``dp-delta``, read from
the results' ``privacy`` block. Every arm keeps the normalisation layers at the sites (``fedbn =
true``: DP refuses batch-norm statistics on the wire, and the baseline must be the same model) and
runs without the median norm bound (``update-norm-factor = 0``, which DP turns off) and takes the
last round's model (``select-on-val = false``: under FedBN the final test pairs the selected
round's global weights with each site's latest local layers, a mismatch when the best validation
round is not the last; fixed since, kept so that a rerun matches benchmarks/results/dp.json), so the arms differ only by DP: the unweighted mean of clipped updates plus
noise instead of FedAvg's example-weighted mean. ``--multipliers 1e-6`` isolates the cost of
clipping and unweighted averaging (noise negligible, epsilon meaningless). Secure aggregation (run
config ``secure-aggregation``, on by default) stays as the preset sets it: with it on, the sites
clip their own updates, the server adds the noise to the masked sum, and how many updates were
clipped is unknown to it (``updates clipped``: -).

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_dp --quick   # smoke: 2 tiny sites x 6 patients, 1 round per phase
    .venv/bin/python -m benchmarks.bench_dp           # 4 sites x 30 patients, BUDGET, z in 0.01 0.1 0.3 1

Writes ``benchmarks/results/dp[_quick].json`` after every run (runs in it with the same setup are
kept: a cut run continues) and the figure ``docs/dp.png`` (quick: under ``--work``).
"""

from __future__ import annotations

import argparse
import sys
import time
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
    mean_sd,
    prepare_federation,
    previous_runs,
    run_fresh,
)
from common.config import RunConfig

# presets/default.toml shortened (its 2 + 8 rounds take ~15 min a run here).
BUDGET = {"pretrain_rounds": 2, "pretrain_max_pairs": 250, "stage_rounds": 4, "stage_epochs": 2}
ARMS = {
    "fedbn": True,
    "update_norm_factor": 0.0,
    "strategy": "fedavg",
    "select_on_val": False,
}  # every run, with DP or without


def _median_norms(history: dict) -> dict[str, float | None]:
    """Median update norm per phase over the run's rounds and sites (guides ``--clip``)."""
    out: dict[str, float | None] = {}
    for phase in ("pretrain", "stage"):
        norms = [
            n for entry in history.get(phase, []) for n in entry.get("update-norms", {}).values() if n > 0
        ]
        out[phase] = float(np.median(norms)) if norms else None
    return out


def run_arm(cfg: RunConfig, n_sites: int, z: float, seed: int) -> dict:
    """One federated run at noise multiplier ``z`` (0: no DP); the figures the tables need."""
    run_cfg = cfg.replace(dp_noise_multiplier=z, seed=seed, run_name=f"{cfg.run_name}-z{z:g}-s{seed}")
    results, seconds = run_fresh(run_cfg, n_sites)
    privacy, history = results.get("privacy", {}), results["history"]
    notes = [
        e["privacy"] for phase in ("pretrain", "stage") for e in history.get(phase, []) if "privacy" in e
    ]
    test = results["test"]
    return {
        "seed": seed,
        "noise_multiplier": z,
        "epsilon": privacy.get("epsilon-total") if z > 0 else None,
        "epsilon_pretrain": privacy.get("pretrain", {}).get("epsilon"),
        "epsilon_stage": privacy.get("stage", {}).get("epsilon"),
        "noise_std_stage": notes[-1]["noise-std"] if notes else None,
        "clipped_share": (sum(n["clipped-sites"] for n in notes) / max(sum(n["sites"] for n in notes), 1))
        if notes and all(n.get("clipped-sites") is not None for n in notes)  # None: secure aggregation
        else None,
        "median_update_norm": _median_norms(history),
        "pooled": auroc(test.get("macro-auroc")),
        "sites": {
            name: {"auroc": auroc(site.get("macro-auroc")), "hips": int(site.get("num-examples", 0))}
            for name, site in test.get("sites", {}).items()
        },
        "failures": len(results.get("failures", [])),
        "seconds": seconds,
    }


def _eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def table(runs: list[dict], delta: float) -> str:
    """One row per noise multiplier: epsilon, pooled AUROC (mean +- SD over seeds), change vs no DP."""
    seeds = sorted({r["seed"] for r in runs})
    base = {r["seed"]: r["pooled"] for r in runs if r["noise_multiplier"] == 0}
    rows = []
    for z in sorted({r["noise_multiplier"] for r in runs}):
        arm = [r for r in runs if r["noise_multiplier"] == z]
        mean, sd = mean_sd([r["pooled"] for r in arm])
        changes = [
            r["pooled"] - base[r["seed"]] for r in arm if r["pooled"] is not None and base.get(r["seed"])
        ]
        clipped = [r["clipped_share"] for r in arm if r.get("clipped_share") is not None]
        rows.append(
            [
                "no DP" if z == 0 else f"{z:g}",
                "inf (no DP)" if z == 0 else _eps(arm[0]["epsilon"]),
                "-" if z == 0 else f"{arm[0]['noise_std_stage']:.3g}",
                "-" if not np.isfinite(mean) else f"{mean:.3f} +- {sd:.3f}",
                "-" if z == 0 or not changes else f"{100 * np.mean(changes):+.1f}",
                "-" if not clipped else f"{100 * np.mean(clipped):.0f} %",
            ]
        )
    header = [
        "noise multiplier z",
        f"epsilon (run, delta {delta:g})",
        "noise std per weight (staging)",
        f"pooled test macro AUROC, mean +- SD ({len(seeds)} seed{'s' * (len(seeds) > 1)})",
        "change vs no DP (points)",
        "updates clipped",
    ]
    return markdown(header, rows)


def plot(runs: list[dict], path: Path, delta: float) -> None:
    """Pooled AUROC against the run's epsilon (log scale), the no-DP AUROC as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [r for r in runs if r["noise_multiplier"] > 0 and r["epsilon"] and r["pooled"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    base = [r["pooled"] for r in runs if r["noise_multiplier"] == 0 and r["pooled"] is not None]
    if base:
        ax.axhline(float(np.mean(base)), color="k", ls="--", lw=1, label="FedAvg, no DP")
    if dp:
        ax.plot([r["epsilon"] for r in dp], [r["pooled"] for r in dp], "o", label="FedAvg + site-level DP")
        for r in dp:
            ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"], r["pooled"]), fontsize=7)
        ax.set_xscale("log")
    ax.axhline(0.5, color="grey", ls=":", lw=0.8, label="chance")
    ax.set(
        xlabel=f"epsilon of the run (both phases, delta {delta:g})",
        ylabel="pooled test macro AUROC",
        ylim=(0.3, 1.0),
        title="Site-level differential privacy: utility vs epsilon",
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke: 2 tiny sites x 6 patients, 1 round per phase"
    )
    parser.add_argument(
        "--multipliers", nargs="+", type=float, default=None, help="z > 0 (default 0.01 0.1 0.3 1)"
    )
    parser.add_argument("--clip", type=float, default=RunConfig().dp_clip_norm, help="dp-clip-norm")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (default 0)")
    parser.add_argument("--seed", type=int, default=11, help="synthetic federation seed (main job: 0)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/dp.json)")
    parser.add_argument("--work", type=Path, default=WORK / "dp", help="run folders")
    parser.add_argument(
        "--data", type=Path, default=None, help="federation folder (default under /tmp/onfh-bench)"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="its cache root (default under /tmp/onfh-bench)"
    )
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default docs/dp.png)")
    args = parser.parse_args(argv)
    args.multipliers = args.multipliers or ([0.01, 0.1, 1.0] if args.quick else [0.01, 0.1, 0.3, 1.0])
    if any(z <= 0 for z in args.multipliers):
        parser.error("--multipliers: every noise multiplier must be > 0 (the run without DP is always made)")
    args.out = args.out or Path(f"benchmarks/results/dp{'_quick' if args.quick else ''}.json")
    args.plot = args.plot or (args.work / "dp_quick.png" if args.quick else Path("docs/dp.png"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n_sites, patients, size, preset = (2, 6, "tiny", "tiny") if args.quick else (4, 30, "default", "default")
    tag = f"{n_sites}x{patients}-{size}-s{args.seed}"
    federation = Federation(
        n_sites, patients, size, PRESETS / f"{preset}.toml",
        args.data or Path(f"/tmp/onfh-bench/fed-dp-{tag}"), args.cache or Path(f"/tmp/onfh-bench/cache-dp-{tag}"),
    )  # fmt: skip
    budget = {**(QUICK_BUDGET if args.quick else BUDGET), **ARMS, "dp_clip_norm": args.clip}
    setup = {"quick": args.quick, "federation": tag, "budget": budget}
    info = machine()
    results = {
        "command": command("bench_dp", argv),
        "machine": info["machine"],
        "date": info["date"],
        "load_average_start": info["load_average_start"],
        "setup": setup,
        "runs": previous_runs(args.out, "setup", setup),
    }
    cfg, _ = prepare_federation(federation, args.work, args.seed, **budget)
    cfg = cfg.replace(run_name=tag)
    results["delta"], results["secure_aggregation"] = cfg.dp_delta, cfg.secure_aggregation

    def update(res: dict) -> None:
        res["table"] = table(res["runs"], cfg.dp_delta)

    log = RunLog(args.out, results, update)
    for seed in args.seeds:
        for z in [0.0, *args.multipliers]:
            if log.done(seed=seed, noise_multiplier=z):
                continue
            run = run_arm(cfg, n_sites, z, seed)
            pooled = "-" if run["pooled"] is None else f"{run['pooled']:.3f}"
            line = f"seed {seed} z {z:g}: epsilon {_eps(run['epsilon'])}, pooled AUROC {pooled}"
            log.record(run, f"{line}, {run['seconds']:.0f} s")
    update(results)
    plot(results["runs"], args.plot, cfg.dp_delta)
    print(f"\nPooled test macro AUROC against epsilon ({tag}):\n{results['table']}")
    print(f"\n{time.time() - log.started:.0f} s -> {args.out}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
