"""The model card that travels with a delivered model: what it is for, how it was trained, how it
scored, and what it cannot do. Built by the server (:mod:`server.delivery`), completed and written
by each site (:mod:`client.delivery`) as ``model_card.json`` and ``model_card.md``.

A card holds settings, site names and counts only: no identifier, date of a scan or path of a site.
"""

from __future__ import annotations

from typing import Any

from common.predict import SCOPE

INTENDED_USE = (
    "Research use. Stages the femoral head on MR (five protocols) into ARCO I-IV for a hip already "
    "diagnosed with osteonecrosis. " + SCOPE[0].upper() + SCOPE[1:] + "."
)
KNOWN_LIMITS = (
    "Trained and tested on synthetic hospitals (the phantom of docs/phantom.md), not on patients.",
    "Four outputs, ARCO I-IV: no answer for a healthy hip, and none for ARCO 0.",
    "The pooled test set is small: read the AUROC with its interval. The server's intervals resample "
    "hips, not patients (it never learns which hips share a patient), so they are too narrow; this "
    "site's own figures below resample its patients.",
    "At a hospital that did not take part, adapt the model first (onfh adapt) and validate it there "
    "(onfh evaluate): docs/benchmarks.md, Generalisation, measures what is lost and what adapting recovers.",
)
CI_METHOD = (
    "95% bootstrap interval from the pooled score histograms: hips resampled stage by stage, "
    "patients not kept together"
)


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown, for people."""
    run, metrics = card["run"], card["metrics"]
    lines = [
        f"# Model card: {card['model']}",
        "",
        f"**Intended use.** {card['intended-use']}",
        "",
        "## Training",
        "",
        f"- run `{run['name']}`, finished {run['finished']}, strategy `{run['strategy']}`, "
        f"{run['pretrain-rounds']} pretraining and {run['stage-rounds']} staging rounds; "
        f"the model is staging round {run['model-round']}",
        f"- secure aggregation: {'on' if run['secure-aggregation'] else 'off'}; differential privacy: "
        + (
            f"epsilon {run['dp-epsilon']:.3g} at delta {run['dp-delta']:g}"
            if run.get("dp-epsilon")
            else "off"
        ),
        f"- preprocessing: {card['preprocessing']}",
        f"- model: {card['model-settings']}",
        "",
        "| site | hips | labelled train | labelled val | labelled test | MR-CT pairs |",
        "|---|---|---|---|---|---|",
    ]
    for name, counts in card["sites"].items():
        lines.append(
            f"| {name} | {counts.get('hips', '-')} | {counts.get('labelled-train', '-')} | "
            f"{counts.get('labelled-val', '-')} | {counts.get('labelled-test', '-')} | {counts.get('pairs', '-')} |"
        )
    intervals = card.get("metrics-ci95", {})
    lines += ["", "## Pooled test (all sites)", "", "| figure | value | 95% CI |", "|---|---|---|"]
    for key, value in metrics.items():
        ci = f"{intervals[key][0]:.3f} - {intervals[key][1]:.3f}" if key in intervals else ""
        lines.append(
            f"| {key} | {value:.3f} | {ci} |" if isinstance(value, float) else f"| {key} | {value} | |"
        )
    if intervals:
        lines += ["", f"CI: {card.get('metrics-ci95-method', CI_METHOD)}."]
    if "site" in card:
        site = card["site"]
        lines += [
            "",
            f"## This copy: {site['name']}",
            "",
            f"Delivered {site['delivered']}; "
            + (
                "personalised: the federation's weights with this site's own normalisation layers (FedBN)."
                if site["personalised"]
                else "the federation's global model."
            ),
        ]
        by_stage = site.get("labelled-hips-by-stage")
        if by_stage:
            lines += ["", "This site's labelled hips by stage (I/II/III/IV; kept here): "
                      + ", ".join(f"{split} {'/'.join(map(str, n))}" for split, n in by_stage.items())]  # fmt: skip
        validation = site.get("validation")
        if validation:
            lines += ["", _validation_markdown(validation)]
    lines += ["", "## Known limits", ""] + [f"- {limit}" for limit in card["known-limits"]]
    return "\n".join(lines) + "\n"


def _validation_markdown(v: dict[str, Any]) -> str:
    """The site's own test of its copy (computed and kept at the site)."""
    if "error" in v:
        return f"Validation on this site's test split: not computed ({v['error']})."
    lines = [
        f"Validation on this site's own test split ({v['hips']} hips of {v['patients']} patient(s); "
        "95% CI resamples patients; computed here, never sent):",
        "",
        "| figure | value | 95% CI |",
        "|---|---|---|",
    ]
    for key, value in v["figures"].items():
        ci = v["ci95"].get(key)
        shown = "- (undefined)" if value is None else f"{value:.3f}"
        lines.append(f"| {key} | {shown} | " + (f"{ci[0]:.3f} - {ci[1]:.3f} |" if ci else "|"))
    return "\n".join(lines)
