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
    "The pooled test set is small: the AUROC below has a wide uncertainty; a confidence interval "
    "needs per-patient scores, which never leave a site (validate at your site before use).",
    "Not validated at a hospital that did not take part in training.",
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
    lines += ["", "## Pooled test (all sites)", "", "| figure | value |", "|---|---|"]
    for key, value in metrics.items():
        lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
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
    lines += ["", "## Known limits", ""] + [f"- {limit}" for limit in card["known-limits"]]
    return "\n".join(lines) + "\n"
