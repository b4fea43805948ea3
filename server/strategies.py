"""The strategies a run can name (run config ``strategy``): Flower's own classes behind the guard.

One class per name of ``common.config.STRATEGIES``, each :class:`server.strategy.GuardedStrategy`
placed before the Flower class, so that each keeps Flower's own aggregation rule and ``start()``;
robust rules check their preconditions first (:mod:`server.robust`). :func:`build_strategy` makes
the one a run config names.
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from common.config import STRATEGIES, RunConfig
from server.bounds import ReplyBounds
from server.privacy import SiteLevelDP
from server.robust import BulyanRule, KrumRule, MultiKrumRule, TrimmedRule
from server.secure_rounds import RevealedMean
from server.strategy import GuardedStrategy, PhaseState, RoundEnd


class GuardedFedAvg(GuardedStrategy, FedAvg):
    """FedAvg: the example-weighted mean of the sites' weights."""


class GuardedFedProx(GuardedStrategy, FedProx):
    """FedProx: FedAvg on the server; the sites add ``proximal-mu`` times the proximal term."""

    def __init__(
        self, state: PhaseState, cfg: RunConfig, reference: dict, on_round_end: RoundEnd | None = None
    ):
        super().__init__(state, cfg, reference, on_round_end, proximal_mu=cfg.proximal_mu)


class _ServerOptimiser(GuardedStrategy):
    """FedAdam, FedYogi, FedAdagrad: the server steps with learning rate ``server-lr``."""

    def __init__(
        self, state: PhaseState, cfg: RunConfig, reference: dict, on_round_end: RoundEnd | None = None
    ):
        super().__init__(state, cfg, reference, on_round_end, eta=cfg.server_lr, eta_l=cfg.stage_lr)


class GuardedFedAdam(_ServerOptimiser, FedAdam, RevealedMean):
    """FedAdam: Adam on the server over the mean update."""


class GuardedFedYogi(_ServerOptimiser, FedYogi, RevealedMean):
    """FedYogi: Yogi on the server over the mean update."""


class GuardedFedAdagrad(_ServerOptimiser, FedAdagrad, RevealedMean):
    """FedAdagrad: Adagrad on the server over the mean update."""


class GuardedFedAvgM(GuardedStrategy, FedAvgM, RevealedMean):
    """FedAvgM: FedAvg with server momentum 0.9."""

    def __init__(
        self, state: PhaseState, cfg: RunConfig, reference: dict, on_round_end: RoundEnd | None = None
    ):
        super().__init__(state, cfg, reference, on_round_end, server_learning_rate=1.0, server_momentum=0.9)


class GuardedFedMedian(GuardedStrategy, FedMedian):
    """FedMedian: the coordinate-wise median of the sites' weights."""


class GuardedFedTrimmedAvg(GuardedStrategy, TrimmedRule, FedTrimmedAvg):
    """FedTrimmedAvg: the coordinate-wise mean without the ``trimmed-beta`` tails (at least one reply each)."""

    def __init__(
        self, state: PhaseState, cfg: RunConfig, reference: dict, on_round_end: RoundEnd | None = None
    ):
        super().__init__(state, cfg, reference, on_round_end, beta=cfg.trimmed_beta)


class _KrumFamily(GuardedStrategy):
    """Krum, Multi-Krum, Bulyan: built to withstand ``num-malicious-sites`` malicious sites."""

    def __init__(
        self, state: PhaseState, cfg: RunConfig, reference: dict, on_round_end: RoundEnd | None = None
    ):
        super().__init__(state, cfg, reference, on_round_end, num_malicious_nodes=cfg.num_malicious_sites)


class GuardedKrum(_KrumFamily, KrumRule, Krum):
    """Krum: the one reply closest to its ``n - f - 2`` nearest neighbours."""


class GuardedMultiKrum(_KrumFamily, MultiKrumRule, MultiKrum):
    """Multi-Krum: the example-weighted mean of the ``n - f`` replies Krum scores best."""


class GuardedBulyan(_KrumFamily, BulyanRule, Bulyan):
    """Bulyan: Multi-Krum picks ``n - 2f`` replies, then a coordinate-wise trimmed mean around their median."""


# Run-config strategy name -> class, in the order of common.config.STRATEGIES (where names are listed).
_BY_NAME: dict[str, type[GuardedStrategy]] = {
    "fedavg": GuardedFedAvg,
    "fedprox": GuardedFedProx,
    "fedadam": GuardedFedAdam,
    "fedyogi": GuardedFedYogi,
    "fedadagrad": GuardedFedAdagrad,
    "fedavgm": GuardedFedAvgM,
    "fedmedian": GuardedFedMedian,
    "fedtrimmedavg": GuardedFedTrimmedAvg,
    "krum": GuardedKrum,
    "multikrum": GuardedMultiKrum,
    "bulyan": GuardedBulyan,
}
if set(_BY_NAME) != set(STRATEGIES):  # not an assert: it must hold under python -O too
    raise ImportError(
        f"server/strategies.py offers {sorted(_BY_NAME)} but common.config.STRATEGIES lists {sorted(STRATEGIES)}: "
        "add or remove the Guarded class so that both agree"
    )
GUARDED: dict[str, type[GuardedStrategy]] = {name: _BY_NAME[name] for name in STRATEGIES}


def build_strategy(
    cfg: RunConfig,
    state: PhaseState,
    reference: dict[str, np.ndarray],
    on_round_end: RoundEnd | None = None,
    inventory: dict[str, dict] | None = None,
    privacy: SiteLevelDP | None = None,
) -> GuardedStrategy:
    """The guarded Flower strategy named by run-config ``strategy`` (see :class:`GuardedStrategy`).

    ``inventory`` (site name -> counts from the inventory query) caps each training reply's
    ``num-examples``; without it nothing is clipped (a strategy built outside a run). ``privacy``: DP.
    """
    strategy = GUARDED[cfg.strategy](state, cfg, reference, on_round_end)
    strategy.bounds = ReplyBounds.for_phase(state.phase, cfg, inventory)
    if privacy is not None:
        strategy.privacy = privacy
        strategy.bounds.norm_factor = 0.0  # the clip bounds updates; a median would couple sites (privacy.py)
    return strategy
