"""Secure aggregation, step by step: the server's session (server/secagg.py) against the sites'
steps (client/secagg.py), messages passed in process so that every attack a server could try is
one call. The run over Flower's simulation is in tests/server/test_secure_run.py.

What is attacked: each vector the server observes is noise (no site's vector recoverable); the
sum is exact; a site dropping after masking leaves the right sum of the rest; with fewer than the
threshold nothing is revealed; and a server that lowers the threshold, swaps a key, asks for both
secrets of one site, or asks twice, is refused by the sites.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from client import secagg as site
from common.secagg import (
    QUANT_LEVELS,
    SecAggError,
    decode_counts,
    decode_update,
    encode_counts,
    evaluation_scale,
    evaluation_sums,
    evaluation_vector,
    threshold_for,
    training_sums,
    training_vector,
)
from server.secagg import SecureSession

STEPS = {"keys": site.keys_reply, "shares": site.shares_reply, "unmask": site.unmask_reply}


class InProcessSession(SecureSession):
    """The server's session with the sites' step functions called in process (no transport)."""

    def __init__(
        self, states: dict[int, RecordDict], labels: list[str], silent: dict[int, str] | None = None
    ):
        self.failures: list[tuple[int, str, str]] = []
        self.asked: list[tuple[int, str]] = []
        self.answers: dict[str, dict[int, ConfigRecord]] = {}  # step -> node -> reply
        super().__init__(None, 1.0, lambda node, step, why: self.failures.append((node, step, why)), labels)
        self.states, self.silent = states, silent or {}

    def _ask(self, nodes, step, per_node, tag=""):
        replies = {}
        for node in nodes:
            self.asked.append((node, step))
            if self.silent.get(node) == step:
                self.on_failure(node, f"secagg-{step}", "no reply")
                continue
            config = ConfigRecord({"query": f"secagg-{step}", **per_node(node)})
            try:
                replies[node] = ConfigRecord(STEPS[step](config, self.states[node]))
            except SecAggError as exc:
                self.on_failure(node, f"secagg-{step}", str(exc))
        self.answers[step] = replies
        return replies


def relay_and_mask(
    session: InProcessSession, label: str, vectors: dict[int, np.ndarray]
) -> dict[int, np.ndarray]:
    """Each site takes in the shares relayed to it and masks its vector: what the server observes."""
    masked = {}
    for node, vector in vectors.items():
        if node not in session.relay:
            continue
        sources, ciphertexts = session.relay[node]
        record = ConfigRecord({"session": session.session, "from": sources, "ciphertexts": ciphertexts})
        site.receive_shares(record, session.states[node])
        masked[node] = site.mask(session.states[node], session.session, label, vector)
    return masked


def federation(n: int, labels=("train",), silent=None) -> InProcessSession:
    states = {100 + k: RecordDict() for k in range(n)}
    return InProcessSession(states, list(labels), silent).open(sorted(states))


def quantised_vectors(nodes, length=5000, seed=0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {node: rng.integers(0, QUANT_LEVELS, length).astype(np.uint32) for node in nodes}


def test_each_observed_vector_is_noise_and_the_sum_is_exact():
    session = federation(4)
    vectors = quantised_vectors(session.shared)
    observed = relay_and_mask(session, "train", vectors)
    for node, y in observed.items():
        x = vectors[node]
        # Unmasked, every value would be below 2**22; masked, they spread over the 2**32 ring.
        assert np.mean(y >= QUANT_LEVELS) > 0.99
        assert abs(np.mean(y / 2.0**32) - 0.5) < 0.02
        assert abs(np.corrcoef(x.astype(float), y.astype(float))[0, 1]) < 0.05
        # Nor does taking away any one other site's vector uncover it.
        for other in observed:
            if other != node:
                assert np.mean((y - observed[other]) < QUANT_LEVELS) < 0.01
    total = session.reveal("train", observed)
    assert np.array_equal(total, sum(v.astype(np.uint32) for v in vectors.values()))
    assert not session.failures


def test_weighted_mean_of_float_updates_within_quantisation():
    session = federation(3)
    rng = np.random.default_rng(1)
    reference = {"w": np.zeros((20, 30), np.float32), "b": np.zeros(30, np.float32)}
    updates = {n: {k: rng.normal(0, 0.1, v.shape) for k, v in reference.items()} for n in session.shared}
    weights = dict(zip(session.shared, (1.0, 0.5, 0.25), strict=True))
    vectors = {
        n: site.encode_update(training_vector(updates[n], weights[n], 0.7), 4.0)[0] for n in session.shared
    }
    total = session.reveal("train", relay_and_mask(session, "train", vectors))
    weight, loss, sums = training_sums(decode_update(total, 3, 4.0), reference)
    assert weight == pytest.approx(1.75, abs=1e-5)
    assert loss / weight == pytest.approx(0.7, abs=1e-5)
    expected = sum(updates[n]["w"] * weights[n] for n in session.shared) / 1.75
    step = 8.0 / QUANT_LEVELS  # one quantisation level
    assert np.max(np.abs(sums["w"] / weight - expected)) <= 3 * step / 1.75 + 1e-12  # a level per site


def test_evaluation_counts_sum_exactly():
    session = federation(3, labels=("evaluate",))
    counts = {n: np.array([7.0 + k, 0.0, 3.0, 12.5 * k]) for k, n in enumerate(session.shared)}
    masked = relay_and_mask(session, "evaluate", {n: encode_counts(v) for n, v in counts.items()})
    summed = decode_counts(session.reveal("evaluate", masked))
    assert np.allclose(summed, sum(counts.values()))


def test_no_site_sends_a_count_the_sum_over_its_session_could_wrap():
    # Five sites each within the old per-site range (2**30 / 1000) summed past 2**31 / 1000 and
    # decoded as a negative figure; now each stays within a fifth of the signed range.
    near_the_old_bound = np.array([1.0e6])
    wrapped = decode_counts(sum(encode_counts(near_the_old_bound, sites=1) for _ in range(3)))
    assert wrapped < 0  # what three sites summed to under the old bound
    with pytest.raises(SecAggError, match=r"fixed-point range of a session of 5 sites \(\+-429497"):
        encode_counts(near_the_old_bound, sites=5)
    fits = np.array([4.0e5])
    assert decode_counts(sum(encode_counts(fits, sites=5) for _ in range(5)))[0] == pytest.approx(2.0e6)


def test_a_large_sites_pretraining_evaluation_fits_a_sessions_range_and_decodes_to_its_means():
    # 5000 validation pairs at an MAE of 150 HU sum to 7.5e5 HU, past the +-4.3e5 a 5-site session
    # allowed at one scale for all: such a site refused every pretraining evaluation.
    sites = {"a": (5000, 150.25, 24.5, 0.8125), "b": (3000, 90.0, 27.0, 0.9)}
    scale = evaluation_scale("pretrain", bins=16)
    vectors = [
        evaluation_vector("pretrain", {"num-examples": n, "mae-hu": m, "psnr": p, "ssim": s}, 16)
        for n, m, p, s in sites.values()
    ]
    total = sum(encode_counts(v, 5, scale) for v in vectors)
    pooled = evaluation_sums("pretrain", decode_counts(total, scale), bins=16)
    assert pooled["num-examples"] == 8000
    assert pooled["mae-hu"] == pytest.approx((5000 * 150.25 + 3000 * 90.0) / 8000, abs=1e-3)
    assert pooled["psnr"] == pytest.approx((5000 * 24.5 + 3000 * 27.0) / 8000, abs=1e-3)
    assert pooled["ssim"] == pytest.approx((5000 * 0.8125 + 3000 * 0.9) / 8000, abs=1e-4)
    with pytest.raises(SecAggError, match=r"session of 5 sites \(\+-4\.29497e\+07\)"):
        encode_counts(evaluation_vector("pretrain", {"num-examples": 5e5, "mae-hu": 100.0}, 16), 5, scale)


def test_a_site_dropping_after_masking_leaves_the_sum_of_the_rest():
    session = federation(5)
    vectors = quantised_vectors(session.shared, seed=2)
    observed = relay_and_mask(session, "train", vectors)
    dropped = session.shared[1]
    del observed[dropped]  # its masked vector never arrives
    total = session.reveal("train", observed)
    assert np.array_equal(total, sum(vectors[n] for n in observed))
    # The other sites revealed the dropped site's pairwise key, never its self-mask seed.
    number = session.ids[dropped]
    for reply in session.answers["unmask"].values():
        assert number in [int(i) for i in reply["sk-ids"]]
        assert number not in [int(i) for i in reply["b-ids"]]


def test_a_site_silent_at_the_unmask_step_is_tolerated_above_the_threshold():
    states_silent = {101: "unmask"}  # 4 sites, threshold 3: one may fail to answer
    session = federation(4, silent=states_silent)
    vectors = quantised_vectors(session.shared, seed=3)
    total = session.reveal("train", relay_and_mask(session, "train", vectors))
    assert np.array_equal(total, sum(vectors.values()))
    assert [(node, step) for node, step, _ in session.failures] == [(101, "secagg-unmask")]


def test_fewer_than_the_threshold_reveals_nothing():
    session = federation(4)
    assert session.threshold == threshold_for(4) == 3
    observed = relay_and_mask(session, "train", quantised_vectors(session.shared, seed=4))
    two = {n: observed[n] for n in session.shared[:2]}
    with pytest.raises(SecAggError, match="fewer than the threshold 3"):
        session.reveal("train", two)
    assert not [step for _, step in session.asked if step == "unmask"], "no share may be asked for"
    # A server that asks anyway (naming only two active sites) gets no share from any site.
    for node in session.shared:
        request = ConfigRecord(
            {"session": session.session, "label": "train", "active": [1, 2], "dropped": [3, 4]}
        )
        with pytest.raises(SecAggError, match="fewer than the threshold"):
            site.unmask_reply(request, session.states[node])


def test_sites_refuse_what_a_malicious_server_asks():
    session = federation(3)
    relay_and_mask(session, "train", quantised_vectors(session.shared, seed=5))
    state = session.states[session.shared[0]]
    # Both secrets of one site (active and dropped at once): refused.
    both = ConfigRecord({"session": session.session, "label": "train", "active": [1, 2, 3], "dropped": [3]})
    with pytest.raises(SecAggError, match="both active and dropped"):
        site.unmask_reply(both, state)
    # Asking twice (e.g. first "site 3 is active", then "site 3 dropped"): the second is refused.
    once = ConfigRecord({"session": session.session, "label": "train", "active": [1, 2, 3]})
    site.unmask_reply(once, state)
    again = ConfigRecord({"session": session.session, "label": "train", "active": [1, 2], "dropped": [3]})
    with pytest.raises(SecAggError, match="already sent once"):
        site.unmask_reply(again, state)
    # A threshold below a majority of the sites: refused at the keys step.
    low = ConfigRecord({"session": "s", "id": 1, "sites": 5, "threshold": 2, "labels": ["train"]})
    with pytest.raises(SecAggError, match="threshold 2 of 5 sites refused"):
        site.keys_reply(low, RecordDict())


def test_a_relayed_key_that_is_not_the_sites_own_is_refused():
    states = {1: RecordDict(), 2: RecordDict(), 3: RecordDict()}
    base = {"session": "s", "sites": 3, "threshold": 2, "labels": ["train"]}
    keys = {n: site.keys_reply(ConfigRecord({**base, "id": n}), states[n]) for n in states}
    listing = {
        "session": "s",
        "ids": [1, 2, 3],
        "c-pk": [
            keys[2]["c-pk"],
            keys[2]["c-pk"],
            keys[3]["c-pk"],
        ],  # site 1's key replaced by the server's pick
        "s-pk-train": [keys[n]["s-pk-train"] for n in (1, 2, 3)],
    }
    with pytest.raises(SecAggError, match="not its own"):
        site.shares_reply(ConfigRecord(listing), states[1])


def test_a_site_with_nothing_to_score_adds_zeros_of_the_right_length():
    from common.secagg import evaluation_length, evaluation_vector

    withheld = {"num-examples": 0, "withheld": 1, "min-release-hips": 1}
    assert np.array_equal(evaluation_vector("stage", withheld, 20), np.zeros(evaluation_length("stage", 20)))
    assert np.array_equal(evaluation_vector("pretrain", withheld, 20), np.zeros(4))
