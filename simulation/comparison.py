"""The main job's comparison: federated vs centralized vs local-only, per site and pooled.

A table (Markdown, printed), ``comparison.json``, a bar chart and a reliability diagram of the
pooled test hips beside the run's results; each column's pooled figure comes with a 95% interval
that resamples patients, and its calibration error (ECE) with the bins behind it.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.config import RunConfig
from common.files import json_safe
from simulation.baselines import pooled_local_auroc, pooled_local_scores


def comparison_table(federated: dict, central: dict, local: dict[str, dict]) -> tuple[list[str], list[list]]:
    """Rows: each site, then pooled. Columns: federated / centralized / local-only macro AUROC.

    Under secure aggregation the federated model has no per-site figure (the server sees only the
    sum of the sites' evaluations): its site cells are empty; test hips come from the inventory.
    """
    fed_sites = federated["test"].get("sites", {})
    inventory = federated.get("history", {}).get("inventory", {})
    names = sorted(set(fed_sites) | set(central.get("sites", {})))
    rows = []
    for name in names:
        rows.append(
            [
                name,
                int(
                    inventory.get(name, {}).get(
                        "labelled-test", fed_sites.get(name, {}).get("num-examples", 0)
                    )
                ),
                fed_sites.get(name, {}).get("macro-auroc"),
                central.get("sites", {}).get(name, {}).get("macro_auroc"),
                local.get(name, {}).get("sites", {}).get(name, {}).get("macro_auroc"),
            ]
        )
    local_pooled = pooled_local_auroc(local)
    rows.append(
        [
            "pooled",
            int(federated["test"].get("n-hips", 0)),
            federated["test"].get("macro-auroc"),
            central.get("pooled", {}).get("macro_auroc"),
            local_pooled,
        ]
    )
    header = ["site", "test hips", "federated", "centralized", "local-only"]
    # An AUROC is undefined (NaN, or -1 from a site) where a test set holds a single stage.
    rows = [[None if isinstance(v, float) and (v != v or v < 0) else v for v in row] for row in rows]
    return header, rows


def format_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None or (isinstance(v, float) and (v != v or v < 0)):  # NaN or -1: undefined here
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_comparison(header: list[str], rows: list[list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r[0] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    for i, label in enumerate(header[2:]):
        values = [r[2 + i] if isinstance(r[2 + i], float) and r[2 + i] >= 0 else np.nan for r in rows]
        ax.bar(x + (i - 1) * 0.27, values, width=0.27, label=label)
    ax.set(
        xticks=x,
        xticklabels=names,
        ylabel="test macro AUROC",
        ylim=(0.4, 1.0),
        title="Federated vs centralized vs local-only (held-out hips)",
    )
    ax.axhline(0.5, color="k", lw=0.5, ls=":")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reliability_points(summary: dict) -> tuple[list[float], list[float]]:
    """The points of one column's reliability curve: mean confidence of the predicted stage and
    accuracy in each confidence bin that holds a hip (:func:`common.evaluate.reliability_bins`)."""
    bins = summary["reliability"]
    filled = [b for b, n in enumerate(bins["hips"]) if n]
    return [bins["confidence"][b] for b in filled], [bins["accuracy"][b] for b in filled]


def plot_reliability(intervals: dict[str, dict], path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Reliability diagram of the pooled test hips, one line per column (its ECE in the legend);
    returns the points plotted, per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = {name: reliability_points(v) for name, v in intervals.items() if "reliability" in v}
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, (confidence, accuracy) in plotted.items():
        ax.plot(confidence, accuracy, "o-", label=f"{name} (ECE {intervals[name]['ece']:.3f})")
    ax.set(
        xlabel="confidence of the predicted stage (mean in bin)",
        ylabel="accuracy in bin",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        title="Reliability on the pooled test hips",
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return plotted


def delivered_scores(cfg: RunConfig, site_dirs: list[Path], split: str = "test"):
    """Run ``cfg.run_name``'s delivered models scored on their own sites' labelled hips of ``split``
    (test unless told), pooled (a ``simulation.generalisation.Scored``); None where no site holds one."""
    from simulation.generalisation import Scored, delivered_model, score, site_data

    parts = []
    for site_dir in site_dirs:
        folder = delivered_model(cfg, site_dir.name, cfg.run_name)
        data = site_data(cfg, site_dir) if (folder / "final_model.npz").is_file() else None
        if data is not None and len(data.staging_set(split)[2]):
            parts.append(score(folder, data, split=split))
    return Scored.join(parts) if parts else None


def pooled_intervals(cfg: RunConfig, site_dirs: list[Path], central: dict, local: dict) -> dict[str, dict]:
    """Each column's pooled test figures with 95% intervals that resample patients; the federated
    column also holds its paired differences from the others (``"minus centralized"``: difference,
    95% interval and p-value of the macro AUROC, the same patients drawn for both models).

    The simulation may read every site, so it scores each site's test hips with the model that site
    received (personalised under FedBN). A real federation's server cannot: its model card carries
    intervals from the pooled histograms, and each site validates its own copy.
    """
    from simulation.generalisation import Scored

    columns = {
        "federated": delivered_scores(cfg, site_dirs),
        "centralized": Scored.from_json(central["scores"]) if "scores" in central else None,
        "local-only": pooled_local_scores(local),
    }
    scored = {name: column for name, column in columns.items() if column is not None}
    summaries = {name: column.summary() for name, column in scored.items()}
    federated = scored.get("federated")
    for other in ("centralized", "local-only"):  # paired: the same hips, patients resampled together
        if federated is not None and other in scored:
            summaries["federated"][f"minus {other}"] = federated.versus(scored[other])
    return summaries


def p_value(p: float, reps: int = 1000) -> str:
    """``p = 0.18``, or ``p < 0.001`` where no bootstrap draw of ``reps`` crossed zero."""
    return f"p < {1 / reps:g}" if p < 1 / reps else f"p = {p:.2f}" if p >= 0.01 else f"p = {p:.3f}"


def paired_lines(intervals: dict[str, dict]) -> list[str]:
    """``federated minus centralized: +0.012 (-0.031 to +0.050), p = 0.61`` for each paired difference."""
    federated = intervals.get("federated", {})
    return [
        f"federated {key}: macro AUROC {v['difference']:+.3f} ({v['ci95'][0]:+.3f} to {v['ci95'][1]:+.3f}), "
        f"{p_value(v['p'])}"
        for key, v in federated.items()
        if key.startswith("minus ")
    ]


def pooled_figures_table(intervals: dict[str, dict]) -> str:
    """Beside each column's macro AUROC: the figures a reader of a staging paper looks for."""
    header = [
        "model",
        "macro AUROC (95% CI)",
        "balanced accuracy",
        "QW kappa",
        "ECE",
        "sensitivity I/II/III/IV",
    ]
    rows = [
        [name, f"{v['macro-auroc']:.3f} ({_interval(v)})", f"{v['balanced-accuracy']:.3f}", f"{v['qw-kappa']:.3f}",
         f"{v['ece']:.3f}", "/".join("-" if x != x else f"{x:.2f}" for x in v["sensitivity"])]
        for name, v in intervals.items()
    ]  # fmt: skip
    return format_table(header, rows)


def _interval(summary: dict | None) -> str:
    ci = (summary or {}).get("ci95", {}).get("macro-auroc")
    return f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-"


def report(
    cfg: RunConfig, federated: dict, central: dict, local: dict, seconds: dict, intervals: dict | None = None
) -> list[Path]:
    """Write comparison.json/.md/.png (and, with ``intervals``, reliability.png) beside the run's
    results, print the table; returns the files written."""
    header, rows = comparison_table(federated, central, local)
    intervals = intervals or {}
    privacy = federated.get("privacy", {})
    if privacy.get("enabled"):  # the federated column says what privacy it bought (server/privacy.py)
        eps = privacy.get("epsilon-total")
        header[2] = f"federated, DP eps {eps:.3g} at delta {privacy['delta']:g}" if eps else "federated, DP"
    table = format_table(header, rows)
    if intervals:
        columns = ("federated", "centralized", "local-only")
        table += (
            "\n| pooled, 95% CI (patients resampled) | | "
            + " | ".join(_interval(intervals.get(c)) for c in columns)
            + " |"
        )
    fed_pooled, central_pooled = rows[-1][2], rows[-1][3]
    ratio = fed_pooled / central_pooled if fed_pooled and central_pooled else None
    summary = {
        "table": {"header": header, "rows": rows},
        "federated-over-centralized": ratio,
        "federated-seconds": seconds["federated"],
        "total-seconds": seconds["total"],
        "failures": federated.get("failures", []),
        "privacy": privacy,
        "pooled-patient-level": intervals,
    }
    (cfg.run_dir / "comparison.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    (cfg.run_dir / "comparison.md").write_text(
        table
        + "\n\n"
        + (
            "\n\n".join([pooled_figures_table(intervals), *paired_lines(intervals)]) + "\n"
            if intervals
            else ""
        )
    )
    plot_comparison(header, rows, cfg.run_dir / "comparison.png")
    written = [cfg.run_dir / f"comparison.{ext}" for ext in ("json", "md", "png")]
    if any("reliability" in v for v in intervals.values()):
        plot_reliability(intervals, cfg.run_dir / "reliability.png")
        written.append(cfg.run_dir / "reliability.png")
    print("\nTest macro AUROC on held-out synthetic hips (per site and pooled):\n")
    print(table)
    if federated["config"].get("secure-aggregation"):
        print(
            "\nfederated: secure aggregation on, the server saw only the sum of the sites' evaluations, "
            "so the federated model has a pooled figure only"
        )
    if intervals:
        print("\nPooled test figures (sensitivity per stage I/II/III/IV):\n")
        print(pooled_figures_table(intervals))
        for line in paired_lines(intervals):
            print(line)
        print(
            "\n95% CI: 1000 bootstrap draws of patients (both hips together); federated: each site's test "
            "hips scored by the model delivered to it"
        )
    if ratio:
        print(f"\nfederated / centralized = {ratio:.3f}")
    if summary["failures"]:
        print(f"\n{len(summary['failures'])} site failures recorded in {cfg.run_dir / 'results.json'}")
    print(f"\nwritten: {', '.join(p.name for p in written)}")
    print(f"\ndone in {summary['total-seconds'] / 60:.1f} min; outputs in {cfg.run_dir}")
    return written
