"""Secure aggregation (SecAgg+) on Flower's Message API: what the site and the server share.

The protocol (Bonawitz et al., CCS 2017; Bell et al., CCS 2020 "SecAgg+") for one aggregation
*label* (``train`` or ``evaluate``) of one *session* (a round), with the sites numbered 1..N:

1. **keys**: each site makes two key pairs per session (``c``: to encrypt the shares it sends to
   each other site; ``s`` per label: key agreement for the pairwise masks) and a 32-byte self-mask
   seed ``b`` per label, and sends the public keys.
2. **shares**: with every site's public keys, each site splits ``b`` and ``s_sk`` of each label in
   Shamir shares (``threshold`` of N reconstruct) and sends share ``j`` to site ``j``, encrypted
   with the key it agrees with ``j`` (the server relays ciphertexts it cannot read).
3. **masked input**: the site's vector ``x`` (integers mod 2**32: :func:`client.secagg.encode_update`,
   :func:`encode_counts`) leaves as ``x + PRG(b) + sum_j sign(i, j) PRG(s_ij)``; the pairwise masks
   cancel in the sum over sites, the self-masks do not.
4. **unmask**: the server names the sites whose vectors came (active) and those that dropped after
   the shares step; each site sends its shares of ``b`` of the active sites and of ``s_sk`` of the
   dropped ones, never both for one site, once per label, and only if at least ``threshold`` are
   active. From ``threshold`` shares the server removes the self-masks and the dropped sites'
   pairwise masks, and learns the sum and nothing else.

Every site's pair of masks with every other site is used (N-1 neighbours): the federations here
have a handful of sites, where SecAgg+'s sparse neighbour graph would save nothing.

Primitives are library code: key agreement (ECDH on P-384), share encryption (Fernet) and Shamir
sharing (pycryptodome, GF(2^128)) are Flower's own (``flwr.common.secure_aggregation``,
``flwr.supercore.primitives.asymmetric``), quantisation is Flower's ``quantize`` (at the site, as
common/ stays Flower-free). The masks are expanded with ChaCha20 from ``cryptography`` (keys from HKDF-SHA256), not Flower's
``pseudo_rand_gen``, which seeds numpy's Mersenne Twister with 32 bits of the seed: 2**32 guesses
would strip a mask.
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import load_pem_public_key

MODULUS_BITS = 32  # vectors are uint32: numpy's wrap-around is the arithmetic mod 2**32
QUANT_LEVELS = 1 << 22  # quantisation levels of [-clip, clip]: a sum of up to 2**10 sites cannot wrap
COUNT_SCALE = 1000  # fixed point of evaluation sums unless told: counts exact, means' sums to 1e-3
LABELS = ("train", "evaluate")
MAX_SITES = 1 << (MODULUS_BITS - 22)


class SecAggError(RuntimeError):
    """A secure aggregation that cannot (or may not) complete; the message says which step and why."""


def threshold_for(n_sites: int) -> int:
    """Shares that reconstruct a secret: a strict majority of the session's sites, at least 2.

    A majority means no two disjoint groups of sites can each give the server enough shares, so a
    server that tells some sites "X dropped" and others "X is active" cannot get both secrets of X.
    """
    return max(2, n_sites // 2 + 1)


def _keystream_words(key: bytes, count: int) -> np.ndarray:
    """``count`` uniform uint32 words: ChaCha20 keystream under a 32-byte key (nonce 0: one key, one use)."""
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\x00" * (4 * count)), dtype="<u4").astype(np.uint32)


def expand(secret: bytes, context: str, count: int) -> np.ndarray:
    """A mask of ``count`` uint32 words from ``secret``, separated by ``context`` (session, label, pair)."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context.encode()).derive(secret)
    return _keystream_words(key, count)


def pair_secret(own: ec.EllipticCurvePrivateKey, peer_public: bytes) -> bytes:
    """The secret two sites agree on (ECDH): either side computes it from its private key and the other's public key."""
    return own.exchange(ec.ECDH(), load_pem_public_key(peer_public))


def self_mask(seed: bytes, session: str, label: str, count: int) -> np.ndarray:
    return expand(seed, f"onfh-secagg/{session}/{label}/self", count)


def pair_mask(secret: bytes, session: str, label: str, i: int, j: int, count: int) -> np.ndarray:
    """The pairwise mask of sites ``i`` and ``j``, added by the lower-numbered site and subtracted by the other."""
    low, high = min(i, j), max(i, j)
    return expand(secret, f"onfh-secagg/{session}/{label}/pair/{low}-{high}", count)


def signed_pair_mask(secret: bytes, session: str, label: str, me: int, peer: int, count: int) -> np.ndarray:
    """The pairwise mask as site ``me`` applies it (``+`` below ``peer``, ``-`` above: the two cancel)."""
    mask = pair_mask(secret, session, label, me, peer, count)
    return mask if me < peer else (np.uint32(0) - mask)


def decode_update(total: np.ndarray, contributors: int, clip: float) -> np.ndarray:
    """The float sum of ``contributors`` vectors from the sum of their quantisation levels
    (:func:`client.secagg.encode_update`)."""
    return total.astype(np.float64) * (2.0 * clip / QUANT_LEVELS) - contributors * clip


def encode_counts(values: np.ndarray, sites: int = 2, scale: float | np.ndarray = COUNT_SCALE) -> np.ndarray:
    """Sums-to-be (counts, example-weighted metrics) as fixed point mod 2**32 (negatives wrap):
    ``values * scale`` rounded, ``scale`` one figure or one per value (:func:`evaluation_scale`).

    Each value stays within a ``sites``-th of the signed range, so that the sum over the session's
    ``sites`` cannot wrap into a wrong figure (a diverged model's MAE once summed to a negative one)."""
    scale = np.broadcast_to(np.asarray(scale, np.float64), np.shape(values))
    fixed = np.rint(np.asarray(values, np.float64) * scale).astype(np.int64)
    bound = (1 << (MODULUS_BITS - 1)) // max(sites, 1)
    if np.any(np.abs(fixed) >= bound):
        worst = int(np.argmax(np.abs(fixed) / bound))
        raise SecAggError(
            f"an evaluation sum ({float(np.asarray(values)[worst]):g}) exceeds the fixed-point range of a "
            f"session of {sites} sites (+-{bound / scale[worst]:g}); this site sends none this round"
        )
    return fixed.astype(np.uint32)


def decode_counts(total: np.ndarray, scale: float | np.ndarray = COUNT_SCALE) -> np.ndarray:
    """The float sums from the sum of :func:`encode_counts` vectors (two's complement mod 2**32)."""
    return total.astype(np.uint32).view(np.int32).astype(np.float64) / np.asarray(scale, np.float64)


def vector_length(shapes: list[tuple[int, ...]]) -> int:
    return int(sum(math.prod(s) for s in shapes))


# -- what a site's vector holds (both sides must agree) -------------------------------------------
def update_layout(reference: dict[str, np.ndarray]) -> int:
    """Length of a training vector: ``[weight, weight x loss, weight x update (arrays in name order)]``."""
    return 2 + vector_length([tuple(v.shape) for v in reference.values()])


def training_vector(update: dict[str, np.ndarray], weight: float, loss: float) -> np.ndarray:
    """A site's training contribution as floats: its weight in the mean, weighted loss, weighted update."""
    parts = [np.array([weight, weight * loss])] + [
        np.asarray(update[k], np.float64).ravel() * weight for k in sorted(update)
    ]
    return np.concatenate(parts)


def training_sums(
    vector: np.ndarray, reference: dict[str, np.ndarray]
) -> tuple[float, float, dict[str, np.ndarray]]:
    """``(sum of weights, sum of weighted losses, sum of weighted updates by array)`` from a decoded sum."""
    weight, loss, offset, arrays = float(vector[0]), float(vector[1]), 2, {}
    for name in sorted(reference):
        size = int(reference[name].size)
        arrays[name] = vector[offset : offset + size].reshape(reference[name].shape)
        offset += size
    return weight, loss, arrays


PRETRAIN_METRICS = ("mae-hu", "psnr", "ssim")


def evaluation_vector(phase: str, metrics: dict, bins: int) -> np.ndarray:
    """A site's evaluation as sums-to-be: staging ``[n, histogram, confusion]``; pretraining
    ``[n, n x mae-hu, n x psnr, n x ssim]``. A site with nothing to score adds zeros."""
    n = float(metrics.get("num-examples", 0))
    if phase == "stage" and "score-histogram" not in metrics:
        return np.zeros(evaluation_length(phase, bins))
    if phase == "stage":
        return np.concatenate([[n], np.asarray(metrics["score-histogram"]), np.asarray(metrics["confusion"])])
    return np.array([n] + [n * float(metrics.get(key, 0.0)) for key in PRETRAIN_METRICS])


# Fixed-point scales of the pretraining sums ``[n, n x mae-hu, n x psnr, n x ssim]``: each to its
# resolution, so that thousands of validation pairs (n x MAE ~ 1e5-1e6 HU) fit a session's range.
PRETRAIN_SCALE = (1.0, 10.0, 100.0, 1000.0)


def evaluation_scale(phase: str, bins: int, classes: int = 4) -> np.ndarray:
    """The fixed-point scale of each value of :func:`evaluation_vector`: staging sends counts (exact
    at scale 1), pretraining example-weighted means (:data:`PRETRAIN_SCALE`)."""
    if phase == "stage":
        return np.ones(evaluation_length(phase, bins, classes))
    return np.array(PRETRAIN_SCALE)


def evaluation_length(phase: str, bins: int, classes: int = 4) -> int:
    return 1 + (classes * 2 * bins + classes * classes if phase == "stage" else len(PRETRAIN_METRICS))


def evaluation_sums(phase: str, vector: np.ndarray, bins: int, classes: int = 4) -> dict:
    """The pooled evaluation from a decoded sum: ``num-examples`` and the histogram and confusion
    counts (staging) or the example-weighted means (pretraining)."""
    n = float(vector[0])
    if phase == "stage":
        cut = 1 + classes * 2 * bins
        return {
            "num-examples": n,
            "score-histogram": np.rint(vector[1:cut]).reshape(classes, 2, bins),
            "confusion": np.rint(vector[cut:]).reshape(classes, classes),
        }
    return {
        "num-examples": n,
        **{
            k: (float(v) / n if n > 0 else float("nan"))
            for k, v in zip(PRETRAIN_METRICS, vector[1:], strict=True)
        },
    }
