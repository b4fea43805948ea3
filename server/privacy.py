"""Site-level differential privacy of the weight updates: fixed clipping, Gaussian noise, accounting.

The unit protected is one site's whole update in a round (site-level, "user-level" DP); the server
is trusted: it sees every update, clips each to ``dp-clip-norm`` and adds the noise (central DP).
The guarantee holds against whoever sees the aggregates and the final model (the other sites, the
model's users). With ``n`` sound updates in a round the released weights are::

    global + mean_i clip(update_i) + N(0, (z * clip / n)^2)   per coordinate, z = dp-noise-multiplier

i.e. noise ``z * clip`` on the sum, whose sensitivity is ``clip`` when one site's update is
replaced by none (the number of sites in a round is public: the run lists who answered). Every
round is a Gaussian mechanism of multiplier ``z``, composed over the rounds of the DP phases with
Google's ``dp-accounting`` (RDP). Every connected site is asked every round, so no amplification by
sampling is claimed (sampling rate 1). The guard's median-relative norm bound (``update-norm-factor``)
is off under DP: the clip bounds every update, and a median would let one site's update decide
whether another's is aggregated, which the noise is not calibrated to. Not covered: evaluation metrics, ``num-examples``, losses and
update norms the sites report (they reach the server and results.json), and a phase run without DP.
Sample-level DP-SGD (Opacus) is not done.

Why not Flower 1.42's ``DifferentialPrivacyServerSideFixedClipping`` / ``...ClientSideFixedClipping``
(read in ``flwr/serverapp/strategy/dp_fixed_clipping.py``): they wrap a strategy from outside, so
they clip replies *before* our guard screens them (a reply of the wrong shape crashes the clipping,
a NaN spreads); one error reply makes them skip the round's aggregation (the guard records the
failure and aggregates the others); the noise uses a ``num_sampled_clients`` fixed when built, not
the number of updates aggregated; they keep FedAvg's weighting by ``num-examples``, where a large
site's share exceeds ``1/n`` and the calibration no longer holds (their accountant refuses unequal
weights, and refuses any strategy that overrides ``aggregate_train``, as the guard does); and their
noise comes from numpy's global generator. Here the guard screens first, the mean is unweighted,
and the noise comes from a generator seeded from the OS's entropy, held only in server memory: a
seed from the run config would let every site (which receives the run config) subtract the noise.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field

import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from common.config import RunConfig
from common.updates import clip_update, l2_norm, update_of  # noqa: F401  (l2_norm: re-exported)

log = logging.getLogger("onfh.server")

PHASES = ("pretrain", "stage")
UNIT = (
    "one site's whole weight update per round (site-level DP); central: the server clips and adds "
    "the noise; neighbouring runs differ in one site's updates replaced by none"
)


def noise_std(noise_multiplier: float, clip_norm: float, n_sites: int) -> float:
    """Standard deviation of the Gaussian noise per coordinate of the mean of ``n_sites`` clipped updates."""
    return noise_multiplier * clip_norm / n_sites


def epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``releases`` Gaussian mechanisms of multiplier ``noise_multiplier`` (RDP).

    0 for no release; infinite for a release without noise.
    """
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier), releases)
    return float(accountant.get_epsilon(delta))


def _fresh_generator() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128))


@dataclass
class SiteLevelDP:
    """The mechanism of one phase: clip each update, average, add calibrated noise, account.

    Args:
        phase: ``"pretrain"`` or ``"stage"``.
        noise_multiplier, clip_norm, delta: run config ``dp-noise-multiplier``, ``dp-clip-norm``, ``dp-delta``.
        prior_releases: noised rounds of the run's earlier phase (composed into the run's epsilon).
        rng: the noise source (tests give a seeded one; a run's is seeded from the OS's entropy).
    """

    phase: str
    noise_multiplier: float
    clip_norm: float
    delta: float
    prior_releases: int = 0
    rng: np.random.Generator = field(default_factory=_fresh_generator, repr=False)

    @classmethod
    def for_phase(cls, cfg: RunConfig, phase: str, prior_releases: int = 0) -> SiteLevelDP | None:
        """The phase's mechanism, or None where ``dp-noise-multiplier`` is 0 or ``dp-phases`` leaves it out."""
        if cfg.dp_noise_multiplier <= 0 or cfg.dp_phases not in ("both", phase):
            return None
        return cls(phase, cfg.dp_noise_multiplier, cfg.dp_clip_norm, cfg.dp_delta, prior_releases)

    def release(
        self,
        sent: dict[str, np.ndarray],
        replies: list[dict[str, np.ndarray]],
        rounds: list[dict],
        round_no: int,
    ) -> tuple[dict[str, np.ndarray], dict]:
        """The round's new global weights from the screened replies, and its note for the round's entry.

        Args:
            sent: the global weights the server sent this round.
            replies: the sound replies' weights (names, shapes and finiteness already checked).
            rounds: the phase's earlier round entries (noised ones carry ``privacy``).
            round_no: the round's number in the phase, for the log line.
        """
        total = {k: np.zeros(v.shape, np.float64) for k, v in sent.items()}
        clipped = 0
        for arrays in replies:
            update, norm = clip_update(update_of(arrays, sent), self.clip_norm)
            clipped += norm > self.clip_norm
            for name, value in update.items():
                total[name] += value
        return self.noise_sum(sent, total, len(replies), int(clipped), rounds, round_no)

    def noise_sum(
        self,
        sent: dict[str, np.ndarray],
        total: dict[str, np.ndarray],
        n: int,
        clipped: int | None,
        rounds: list[dict],
        round_no: int,
    ) -> tuple[dict[str, np.ndarray], dict]:
        """The new global weights from ``total``, the sum of ``n`` clipped updates, plus the noise.

        Under secure aggregation the sites clip their own updates and the server gets only
        ``total``; ``clipped`` (how many updates the clip shortened) is then None: unknown here.
        """
        std = noise_std(self.noise_multiplier, self.clip_norm, n)
        released = {
            name: (
                sent[name].astype(np.float64) + total[name] / n + self.rng.normal(0.0, std, sent[name].shape)
            ).astype(sent[name].dtype)
            for name in sent
        }
        releases = 1 + sum(1 for entry in rounds if "privacy" in entry)
        note = {
            "sites": n,
            "clipped-sites": clipped,
            "noise-std": std,
            "releases": releases,
            "epsilon-phase": epsilon(self.noise_multiplier, releases, self.delta),
            "epsilon-run": epsilon(self.noise_multiplier, self.prior_releases + releases, self.delta),
        }
        log.info(
            "[%s round %d] DP: %d site updates (%s clipped to L2 %g), noise std %.3g; "
            "epsilon %.4g this phase, %.4g run so far, at delta %g",
            self.phase,
            round_no,
            n,
            "?" if clipped is None else clipped,
            self.clip_norm,
            std,
            note["epsilon-phase"],
            note["epsilon-run"],
            self.delta,
        )
        return released, note


def noised_rounds(history: dict, phase: str) -> int:
    """Rounds of ``phase`` in the run's history whose aggregate was noised."""
    return sum(1 for entry in history.get(phase, []) if "privacy" in entry)


def privacy_report(cfg: RunConfig, history: dict) -> dict:
    """The ``privacy`` block of results.json: settings, rounds and epsilon per phase and for the run.

    A phase left out by ``dp-phases`` that ran has no guarantee (epsilon None), nor then has the
    run as a whole.
    """
    z, delta = cfg.dp_noise_multiplier, cfg.dp_delta
    report: dict = {"enabled": z > 0, "noise-multiplier": z}
    if z <= 0:
        return report
    report.update(
        {
            "clip-norm": cfg.dp_clip_norm,
            "delta": delta,
            "phases": cfg.dp_phases,
            "unit": UNIT,
            "sampling-rate": 1.0,
            "accountant": "RDP, Gaussian mechanism composed over the noised rounds (dp-accounting)",
        }
    )
    total, unguarded = 0, []
    for phase in PHASES:
        rounds, noised = len(history.get(phase, [])), noised_rounds(history, phase)
        covered = cfg.dp_phases in ("both", phase)
        report[phase] = {
            "dp": covered,
            "rounds": rounds,
            "noised-rounds": noised,  # fewer than rounds only where no site sent an update
            "epsilon": epsilon(z, noised, delta) if covered else None,
        }
        if covered:
            total += noised
        elif rounds:
            unguarded.append(phase)
    report["epsilon-total"] = None if unguarded else epsilon(z, total, delta)
    if unguarded:
        report["not-covered"] = f"phase {', '.join(unguarded)} released its aggregates without noise"
    return report
