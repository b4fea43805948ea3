"""How hard the phantom's staging task is: each knob a stated, tested property (docs/phantom.md).

``easy`` is the phantom as first built: every stage has its own unmistakable cues, so every model
solves it. ``clinical`` is calibrated (docs/phantom.md, "Difficulty") so that stage cues overlap
between neighbouring stages as ARCO readers meet them, lesion tissue is subtle on MR while CT
still shows it, noise is at clinical levels and a share of labels disagree with the truth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np


@dataclass(frozen=True)
class Difficulty:
    """The knobs (defaults = ``easy``).

    Attributes:
        mr_lesion_contrast: MR signal of every lesion tissue (oedema, necrosis, rim, cysts, cleft,
            compaction) is ``marrow + c * (tissue - marrow)`` on every protocol; CT unchanged.
        cue_overlap: chance that a stage's defining cue is missing or subtle (stage II without
            cysts or a clear double line, stage III with a hairline cleft, stage IV without
            narrowing or acetabular change), and half that chance that a lower stage shows a
            neighbouring stage's secondary cue (a cyst at stage I, mild narrowing at stage III).
        marrow_by_stage: fibrosis and oedema depend on stage (False: drawn alike at every stage).
        lesion_spread: 0 = anterosuperior lesion of the usual size; 1 = centred anywhere on the
            weight-bearing dome (0-70 deg from superior, medial or lateral) and sizes wider.
        noise_scale: multiplies every site's MR noise.
        reader_disagreement: share of labelled hips whose label is a neighbouring stage (the
            truth, kept beside the labels, is not).
        ct_shows_lesions: False writes every lesion tissue at fatty-marrow HU on CT (MR unchanged):
            a lesion-blind CT, the control of the pretraining experiment (does MR-to-CT
            pretraining help because CT shows what MR hides?). Not a difficulty of staging.
    """

    mr_lesion_contrast: float = 1.0
    cue_overlap: float = 0.0
    marrow_by_stage: bool = True
    lesion_spread: float = 0.0
    noise_scale: float = 1.0
    reader_disagreement: float = 0.0
    ct_shows_lesions: bool = True

    def __post_init__(self) -> None:
        for name in ("mr_lesion_contrast", "cue_overlap", "lesion_spread", "reader_disagreement"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"phantom difficulty {name.replace('_', '-')} must be in [0, 1], got {value}"
                )
        if not 0.0 < self.noise_scale <= 10.0:
            raise ValueError(f"phantom difficulty noise-scale must be in (0, 10], got {self.noise_scale}")

    def to_json(self) -> dict:
        knobs = asdict(self)
        if self.ct_shows_lesions:  # the default is left out: federations written before it still match
            del knobs["ct_shows_lesions"]
        return knobs

    @classmethod
    def from_json(cls, data: dict) -> Difficulty:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


EASY = Difficulty()
# Chosen by the sweep in docs/phantom.md ("Difficulty") on tuning seeds, never the evaluation seed.
CLINICAL = Difficulty(
    mr_lesion_contrast=0.1,
    cue_overlap=0.3,
    marrow_by_stage=False,
    lesion_spread=1.0,
    noise_scale=2.0,
    reader_disagreement=0.1,
)
DIFFICULTIES: dict[str, Difficulty] = {"easy": EASY, "clinical": CLINICAL}
# What `onfh synth` and `onfh simulate` write unless told otherwise. (``generate_federation``'s own
# default stays ``easy``: the tests' small federations must be learnable in a round or two.)
CLI_DEFAULT = "clinical"


def difficulty_named(name: str, **overrides: float | bool | None) -> Difficulty:
    """A preset by name with some knobs replaced (``None`` values ignored).

    Raises:
        ValueError: an unknown preset name (the message lists the known ones).
    """
    if name not in DIFFICULTIES:
        raise ValueError(f"unknown phantom difficulty {name!r}; choose one of {', '.join(DIFFICULTIES)}")
    return replace(DIFFICULTIES[name], **{k: v for k, v in overrides.items() if v is not None})


def add_difficulty_option(parser) -> None:
    """``--difficulty`` of ``onfh synth`` and ``onfh simulate`` (an ``argparse`` parser)."""
    parser.add_argument(
        "--difficulty",
        choices=list(DIFFICULTIES),
        default=CLI_DEFAULT,
        help=f"how hard staging is: 'clinical' (calibrated; docs/phantom.md) or 'easy' (every cue clear); "
        f"default {CLI_DEFAULT}",
    )


def reader_label(true_stage: int, rng: np.random.Generator, disagreement: float) -> int:
    """The stage a reader writes for a hip of ``true_stage`` (1-4): a neighbour with chance
    ``disagreement`` (either side with equal chance; the only neighbour at stages I and IV)."""
    if rng.random() >= disagreement:
        return true_stage
    if true_stage == 1:
        return 2
    if true_stage == 4:
        return 3
    return true_stage + (1 if rng.random() < 0.5 else -1)
