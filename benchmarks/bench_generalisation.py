"""Generalisation: in-federation vs left-out vs foreign-site AUROC, and a site that joins later.

Two synthetic data sets, neither used to choose any default or budget (their seeds were picked for
this benchmark before it first ran, and nothing was tuned after):

- the **federation**: 4 hospitals x 30 patients (the main job's size) from seed ``--seed`` (2026);
- a **foreign hospital**: one site of a federation drawn from seed ``--foreign-seed`` (3031), 90
  patients, so its scanner (gain, noise, bias field, resolution) and stage mix are its own.

Every model is trained with presets/default.toml (the main job's settings, secure aggregation on):

1. **In-federation**: FedAvg, FedBN and the centralized model trained on all 4 sites, each scored on
   every site's held-out test hips (FedBN: each site's own delivered model, with its layers).
2. **Left out**: for each site in turn, the same three trained on the other 3 sites, scored on the
   left-out site's test hips; as delivered, and with batch statistics re-estimated on the left-out
   site's unlabelled hips (``+AdaBN``, ``onfh adapt --labels 0``). FedBN has no normalisation
   layers for a site it never saw, so it is scored with AdaBN only. Pooled over the 4 folds, the
   left-out scores cover the same hips as the in-federation ones: the difference is paired.
3. **Foreign**: the all-site models on the foreign hospital's test hips.
4. **Late joining**: the all-site FedAvg model at the foreign hospital, adapted with 0 labels
   (AdaBN), then fine-tuned (``onfh adapt --labels N``, 10 epochs) on N = 4, 8, 16 labelled training
   hips (3 draws of patients each) and on all of them; beside it, a model trained on the foreign
   hospital alone with all its labels (both phases, the federation's budget).

Every AUROC comes with a 95% interval that resamples patients (1000 draws); differences are paired
(same hips, same draws) with a two-sided bootstrap p-value.

Usage (from the repository root; about 75 minutes on 2 cores):
    .venv/bin/python -m benchmarks.bench_generalisation [--work /tmp/onfh-bench/generalisation]
    .venv/bin/python -m benchmarks.bench_generalisation --report   # tables and figures from saved scores

Trained models and scores are kept under ``--work``: a cut run continues where it stopped. Writes
``benchmarks/results/generalisation.json``, ``docs/generalisation.png`` and ``docs/late_joining.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import PRESETS, command, machine, markdown, write_json
from common.files import json_safe
from simulation.generalisation import (
    Scored,
    centralized_model,
    delivered_model,
    federated_model,
    leave_one_site_out,
    score,
    score_net,
    site_data,
)

LATE_LABELS = (4, 8, 16)
LATE_DRAWS = 3
MODELS = ("fedavg", "fedbn", "centralized")


class Scores:
    """Hip-level scores by name, saved after each step (``scores.json`` under the work folder)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        raw = json.loads(path.read_text()) if path.is_file() else {}
        self.items = {k: Scored.from_json(v) for k, v in raw.items()}

    def get(self, name: str, compute) -> Scored:
        if name not in self.items:
            self.items[name] = compute()
            self.path.write_text(json.dumps({k: v.to_json() for k, v in self.items.items()}))
        return self.items[name]


def prepare(args: argparse.Namespace):
    from common.config import load_run_config
    from simulation.main_job import preprocess_sites
    from simulation.synth.federation import generate_federation

    work = args.work.resolve()
    fed_dir, foreign_dir = work / "federation", work / "foreign"
    cfg = load_run_config(
        PRESETS / ("tiny.toml" if args.quick else "default.toml"),
        data_root=str(fed_dir),
        cache_dir=str(work / "cache"),
        output_dir=str(work / "runs"),
        run_name="unused",
    )
    size = "tiny" if args.quick else "default"
    generate_federation(fed_dir, sites=args.sites, patients=args.patients, seed=args.seed, size=size)
    generate_federation(
        foreign_dir, sites=1, patients=args.foreign_patients, seed=args.foreign_seed, size=size
    )
    sites = sorted(d for d in fed_dir.iterdir() if d.is_dir() and d.name.startswith("site-"))
    foreign_cfg = cfg.replace(cache_dir=str(work / "cache-foreign"))
    preprocess_sites(cfg, sites)
    preprocess_sites(foreign_cfg, [foreign_dir / "site-00"])
    return cfg, sites, foreign_cfg, foreign_dir / "site-00"


def run(args: argparse.Namespace) -> None:
    from common.adapt import adapt
    from common.predict import load_model

    cfg, sites, foreign_cfg, foreign = prepare(args)
    work = args.work.resolve()
    scores = Scores(work / "scores.json")
    say = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    data = {d.name: site_data(cfg, d) for d in sites}
    foreign_data = site_data(foreign_cfg, foreign)
    names = [d.name for d in sites]

    # 1. All four sites.
    say("all-site FedAvg")
    fedavg = federated_model(cfg, names, "all-fedavg")
    say("all-site centralized")
    central = centralized_model(cfg, sites, work / "centralized-all")
    for s in names:
        scores.get(f"in/fedavg/{s}", lambda s=s: score(delivered_model(cfg, s, "all-fedavg"), data[s]))
        scores.get(f"in/centralized/{s}", lambda s=s: score(central, data[s]))

    # 2. Left out (FedAvg and centralized), then the foreign site and the late-joining curve.
    say("leave-one-site-out, FedAvg and centralized")
    if not all(f"out/fedavg/{s}" in scores.items for s in names):
        folds = leave_one_site_out(cfg, sites, work, fedbn=False, centralized=True, progress=say)
        for s, fold in folds.items():
            for condition, scored in fold["scores"].items():
                model, _, adabn = condition.partition("+")
                kind = "fedavg" if model == "federated" else "centralized"
                scores.get(f"out/{kind}{'+adabn' if adabn else ''}/{s}", lambda scored=scored: scored)

    say("foreign site: all-site models")
    scores.get("foreign/fedavg", lambda: score(fedavg, foreign_data))
    scores.get("foreign/fedavg+adabn", lambda: score(fedavg, foreign_data, adapt=True))
    scores.get("foreign/centralized", lambda: score(central, foreign_data))
    scores.get("foreign/centralized+adabn", lambda: score(central, foreign_data, adapt=True))

    say("late joining: FedAvg model adapted at the foreign site")

    def adapted(labels: int | None, draw: int) -> Scored:
        net, run_cfg, _ = load_model(fedavg)
        adapt(net, run_cfg, foreign_data, labels, seed=draw)
        return score_net(net, foreign_data)

    for n in LATE_LABELS:
        for draw in range(LATE_DRAWS):
            say(f"  fine-tune on {n} labels, draw {draw}")
            scores.get(f"late/{n}/{draw}", lambda n=n, draw=draw: adapted(n, draw))
    scores.get("late/all/0", lambda: adapted(None, 0))
    say("  foreign site alone, all labels")
    alone = centralized_model(foreign_cfg, [foreign], work / "foreign-alone")
    scores.get("late/alone", lambda: score(alone, foreign_data))

    # 3. FedBN: all sites (delivered, personalised), left out and foreign with AdaBN.
    say("all-site FedBN")
    fedbn = federated_model(cfg.replace(fedbn=True), names, "all-fedbn")
    for s in names:
        scores.get(f"in/fedbn/{s}", lambda s=s: score(delivered_model(cfg, s, "all-fedbn"), data[s]))
    scores.get("foreign/fedbn+adabn", lambda: score(fedbn, foreign_data, adapt=True))
    say("leave-one-site-out, FedBN")
    if not all(f"out/fedbn+adabn/{s}" in scores.items for s in names):
        folds = leave_one_site_out(cfg, sites, work, fedbn=True, centralized=False, progress=say)
        for s, fold in folds.items():
            scores.get(f"out/fedbn+adabn/{s}", lambda fold=fold: fold["scores"]["federated+adabn"])


def pooled(scores: dict[str, Scored], prefix: str, names: list[str]) -> Scored | None:
    parts = [scores.get(f"{prefix}/{s}") for s in names]
    return Scored.join(parts) if all(p is not None for p in parts) else None


def cell(summary: dict | None) -> str:
    if summary is None:
        return "not run"
    if not np.isfinite(summary["macro-auroc"]):
        return "- (one stage)"
    ci = summary["ci95"].get("macro-auroc")
    return (
        f"{summary['macro-auroc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if ci else f"{summary['macro-auroc']:.3f}"
    )


def report(args: argparse.Namespace, argv: list[str] | None) -> dict:
    work = args.work.resolve()
    scores = Scores(work / "scores.json").items
    names = sorted({k.split("/")[-1] for k in scores if k.startswith("in/")})
    results: dict = {"command": command("bench_generalisation", argv), **machine(),
                     "federation": {"seed": args.seed, "sites": args.sites, "patients": args.patients},
                     "foreign": {"seed": args.foreign_seed, "patients": args.foreign_patients},
                     "tables": {}}  # fmt: skip
    summaries: dict[str, dict | None] = {}

    def summary(name: str, s: Scored | None) -> dict | None:
        summaries[name] = s.summary() if s is not None else None
        return summaries[name]

    rows = []
    for model in MODELS:
        inside = pooled(scores, f"in/{model}", names)
        out_plain = pooled(scores, f"out/{model}", names) if model != "fedbn" else None
        out_adabn = pooled(scores, f"out/{model}+adabn", names)
        best = out_adabn if model == "fedbn" else out_plain
        paired = best.versus(inside) if best is not None and inside is not None else None
        si = summary(f"in/{model}", inside)
        rows.append([
            model, cell(si), "-" if model == "fedbn" else cell(summary(f"out/{model}", out_plain)),
            cell(summary(f"out/{model}+adabn", out_adabn)),
            f"{paired['difference']:+.3f} ({paired['ci95'][0]:+.3f} to {paired['ci95'][1]:+.3f}), p={paired['p']:.3f}"
            if paired else "not run",
            f"{best.summary()['macro-auroc'] / si['macro-auroc']:.3f}" if best is not None and si else "-",
        ])  # fmt: skip
    header = ["model", "in-federation", "left out, as delivered", "left out, +AdaBN",
              "left out minus in-federation (paired)", "left out / in"]  # fmt: skip
    results["tables"]["leave-one-site-out"] = {"header": header, "rows": rows}
    per_site = [[s] + [cell(summary(f"{w}/{m}/{s}", scores.get(f"{w}/{m}/{s}")))
                       for w, m in (("in", "fedavg"), ("out", "fedavg"), ("out", "fedavg+adabn"),
                                    ("in", "fedbn"), ("out", "fedbn+adabn"), ("in", "centralized"),
                                    ("out", "centralized"))] for s in names]  # fmt: skip
    results["tables"]["per-site"] = {
        "header": ["site", "FedAvg in", "FedAvg out", "FedAvg out +AdaBN", "FedBN in", "FedBN out +AdaBN",
                   "centralized in", "centralized out"],
        "rows": per_site,
    }  # fmt: skip
    foreign_rows = [[k.split("/", 1)[1], cell(summary(k, scores.get(k)))]
                    for k in ("foreign/fedavg", "foreign/fedavg+adabn", "foreign/fedbn+adabn",
                              "foreign/centralized", "foreign/centralized+adabn")]  # fmt: skip
    results["tables"]["foreign"] = {
        "header": [f"model (trained on all {args.sites} sites)", "foreign site"],
        "rows": foreign_rows,
    }
    curve = []
    for n in LATE_LABELS:
        draws = [scores[f"late/{n}/{d}"] for d in range(LATE_DRAWS) if f"late/{n}/{d}" in scores]
        values = [s.summary(reps=200)["macro-auroc"] for s in draws]
        if values:
            curve.append([n, float(np.mean(values)), float(np.std(values)), len(values)])
    late_rows = [["0 (AdaBN)", cell(summaries.get("foreign/fedavg+adabn"))]]
    late_rows += [[str(n), f"{m:.3f} (sd {sd:.3f} over {k} draws)"] for n, m, sd, k in curve]
    for key, label in (("late/all/0", "all"), ("late/alone", "all, site alone (no federation)")):
        if key in scores:
            late_rows.append([label, cell(summary(key, scores[key]))])
    results["tables"]["late-joining"] = {
        "header": ["labels used", "foreign-site test AUROC"],
        "rows": late_rows,
    }
    results["late-joining-curve"] = curve
    results["summaries"] = summaries
    for name, table in results["tables"].items():
        print(f"\n{name}\n\n" + markdown(table["header"], table["rows"]))
    write_json(args.out, json_safe(results))
    plot(results, args.figures)
    return results


def plot(results: dict, figures: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summaries"]
    groups = [("in-federation", "in/{}"), ("left out", "out/{}"), ("left out +AdaBN", "out/{}+adabn"),
              ("foreign", "foreign/{}"), ("foreign +AdaBN", "foreign/{}+adabn")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, model in enumerate(MODELS):
        xs, ys, lo, hi = [], [], [], []
        for g, (_, key) in enumerate(groups):
            value = s.get(key.format(model))
            if value and np.isfinite(value["macro-auroc"]):
                ci = value["ci95"].get("macro-auroc", (value["macro-auroc"],) * 2)
                xs.append(g + (i - 1) * 0.25)
                ys.append(value["macro-auroc"])
                lo.append(value["macro-auroc"] - ci[0])
                hi.append(ci[1] - value["macro-auroc"])
        ax.bar(xs, ys, width=0.25, yerr=[lo, hi], capsize=3, label=model)
    ax.set(xticks=range(len(groups)), xticklabels=[g for g, _ in groups], ylim=(0.4, 1.0), ylabel="test macro AUROC",
           title="Where the hospital was: in the federation, left out, or from elsewhere (95% CI, patients)")  # fmt: skip
    ax.axhline(0.5, color="k", lw=0.5, ls=":")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(figures / "generalisation.png", dpi=110)
    plt.close(fig)

    curve = results["late-joining-curve"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    zero = s.get("foreign/fedavg+adabn")
    xs = [0] + [c[0] for c in curve]
    ys = [zero["macro-auroc"] if zero else np.nan] + [c[1] for c in curve]
    sds = [0] + [c[2] for c in curve]
    ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, label="FedAvg model, adapted at the site")
    for key, label, style in (("late/all/0", "fine-tuned on all its labels", "--"),
                              ("late/alone", "trained on the site alone, all labels", ":")):  # fmt: skip
        if s.get(key):
            ax.axhline(s[key]["macro-auroc"], ls=style, color="grey", label=label)
    if s.get("foreign/fedavg"):
        ax.axhline(s["foreign/fedavg"]["macro-auroc"], ls="-.", color="tab:red", label="as delivered")
    ax.set(xlabel="labelled hips of the new site used", ylabel="test macro AUROC at the new site",
           title="A hospital joining later")  # fmt: skip
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(figures / "late_joining.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/onfh-bench/generalisation"))
    parser.add_argument("--seed", type=int, default=2026, help="the federation's seed")
    parser.add_argument("--foreign-seed", type=int, default=3031, help="the foreign hospital's seed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/generalisation.json"))
    parser.add_argument("--report", action="store_true", help="only tables and figures from saved scores")
    parser.add_argument("--quick", action="store_true", help="smoke: 3 tiny sites x 6 patients, tiny preset")
    args = parser.parse_args(argv)
    args.sites, args.patients, args.foreign_patients = (3, 6, 12) if args.quick else (4, 30, 90)
    if args.quick:
        args.work = args.work.with_name(args.work.name + "-quick")
        args.out = args.out.with_name(args.out.stem + "_quick.json")
        args.figures = args.work
    else:
        args.figures = Path("docs")
    if not args.report:
        run(args)
    report(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
