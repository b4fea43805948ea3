"""The site's side of secure aggregation (:mod:`common.secagg`): keys, shares, masking, unmasking.

The session's secrets live in the ClientApp's ``context.state`` (Flower keeps it on the SuperNode
between the messages of one run; it never leaves the site), one session at a time: a new session
replaces the last. Every check here is the site's own: the server cannot lower the threshold,
ask twice for one label's shares, ask for both secrets of one site, or have a vector unmasked with
fewer than ``threshold`` sites in the sum. A refusal raises :class:`SecAggError`, whose text the
site sends as its error reply (it names only the rule broken).
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.quantization import quantize
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from common.secagg import (
    LABELS,
    MAX_SITES,
    QUANT_LEVELS,
    SecAggError,
    pair_secret,
    self_mask,
    signed_pair_mask,
    threshold_for,
)

STATE_KEY = "secagg-session"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


def _load(state: RecordDict, session: str) -> dict[str, Any]:
    if STATE_KEY not in state.config_records:
        raise SecAggError(f"secure aggregation session {session}: no keys were made for it at this site")
    saved = json.loads(str(state.config_records[STATE_KEY]["json"]))
    if saved["session"] != session:
        raise SecAggError(f"secure aggregation session {session}: this site's keys are for another session")
    return saved


def _save(state: RecordDict, saved: dict[str, Any]) -> None:
    state[STATE_KEY] = ConfigRecord({"json": json.dumps(saved)})


def _ints(config: ConfigRecord, key: str) -> list[int]:
    return [int(v) for v in config[key]] if key in config else []


def keys_reply(config: ConfigRecord, state: RecordDict) -> dict[str, bytes]:
    """Step 1: a fresh session's key pairs and self-mask seeds; the public keys are the reply."""
    session, me, n = str(config["session"]), int(config["id"]), int(config["sites"])
    labels, threshold = [str(v) for v in config["labels"]], int(config["threshold"])
    if not 2 <= n <= MAX_SITES or not 1 <= me <= n:
        raise SecAggError(
            f"secure aggregation: site number {me} of {n} is out of range (2..{MAX_SITES} sites)"
        )
    if threshold < threshold_for(n) or threshold > n:
        raise SecAggError(
            f"secure aggregation: threshold {threshold} of {n} sites refused (this site needs {threshold_for(n)}..{n})"
        )
    if not labels or set(labels) - set(LABELS) or len(set(labels)) != len(labels):
        raise SecAggError(f"secure aggregation: labels {labels} refused (known: {', '.join(LABELS)})")
    c_sk, c_pk = generate_key_pairs()
    saved: dict[str, Any] = {
        "session": session,
        "me": me,
        "sites": n,
        "threshold": threshold,
        "c-sk": _b64(private_key_to_bytes(c_sk)),
        "labels": {},
        "peers": {},  # id -> public keys, from the shares step
        "held": {},  # id -> {label: {"b": share, "sk": share}}: the shares other sites gave this one
        "masked": [],
        "unmasked": [],
    }
    reply = {"c-pk": public_key_to_bytes(c_pk)}
    for label in labels:
        s_sk, s_pk = generate_key_pairs()
        saved["labels"][label] = {
            "s-sk": _b64(private_key_to_bytes(s_sk)),
            "b": _b64(secrets.token_bytes(32)),
        }
        reply[f"s-pk-{label}"] = public_key_to_bytes(s_pk)
    _save(state, saved)
    return reply


def shares_reply(config: ConfigRecord, state: RecordDict) -> dict[str, list]:
    """Step 2: Shamir shares of each label's ``b`` and ``s_sk``, one ciphertext per other site."""
    saved = _load(state, str(config["session"]))
    ids, me = _ints(config, "ids"), saved["me"]
    labels = list(saved["labels"])
    if len(set(ids)) != len(ids) or me not in ids or any(not 1 <= i <= saved["sites"] for i in ids):
        raise SecAggError("secure aggregation: the list of sites is malformed or leaves this site out")
    if len(ids) < saved["threshold"]:
        raise SecAggError(
            f"secure aggregation: {len(ids)} sites left after the keys step, fewer than the threshold "
            f"{saved['threshold']}; nothing is shared"
        )
    c_pks = list(config["c-pk"])
    s_pks = {label: list(config[f"s-pk-{label}"]) for label in labels}
    own_c_sk = bytes_to_private_key(_unb64(saved["c-sk"]))
    if bytes(c_pks[ids.index(me)]) != public_key_to_bytes(own_c_sk.public_key()):
        raise SecAggError("secure aggregation: the server relayed a key for this site that is not its own")
    saved["peers"] = {
        str(i): {"c-pk": _b64(bytes(c_pks[k])), **{label: _b64(bytes(s_pks[label][k])) for label in labels}}
        for k, i in enumerate(ids)
    }
    shares = {}  # label -> secret -> share list indexed by site number - 1
    for label, secret in saved["labels"].items():
        shares[label] = {
            "b": create_shares(_unb64(secret["b"]), saved["threshold"], saved["sites"]),
            "sk": create_shares(_unb64(secret["s-sk"]), saved["threshold"], saved["sites"]),
        }
    to, ciphertexts = [], []
    for k, peer in enumerate(ids):
        plain = {
            "session": saved["session"],
            "src": me,
            "dst": peer,
            "shares": {
                label: {kind: _b64(parts[peer - 1]) for kind, parts in by_kind.items()}
                for label, by_kind in shares.items()
            },
        }
        if peer == me:  # this site's own share of its own secrets is kept, not sent
            saved["held"][str(me)] = plain["shares"]
            continue
        key = generate_shared_key(own_c_sk, bytes_to_public_key(bytes(c_pks[k])))
        to.append(peer)
        ciphertexts.append(encrypt(key, json.dumps(plain).encode()))
    _save(state, saved)
    return {"to": to, "ciphertexts": ciphertexts}


def receive_shares(config: ConfigRecord, state: RecordDict) -> None:
    """The shares other sites sent this one (relayed by the server with a masked step's message)."""
    saved = _load(state, str(config["session"]))
    own_c_sk = bytes_to_private_key(_unb64(saved["c-sk"]))
    for src, ciphertext in zip(_ints(config, "from"), list(config.get("ciphertexts", [])), strict=True):
        peer = saved["peers"].get(str(src))
        if peer is None:
            raise SecAggError(
                f"secure aggregation: shares relayed from site {src}, which is not in this session"
            )
        key = generate_shared_key(own_c_sk, bytes_to_public_key(_unb64(peer["c-pk"])))
        plain = json.loads(decrypt(key, bytes(ciphertext)))
        if plain["session"] != saved["session"] or plain["src"] != src or plain["dst"] != saved["me"]:
            raise SecAggError(
                f"secure aggregation: the shares relayed from site {src} are for another session or site"
            )
        saved["held"][str(src)] = plain["shares"]
    if len(saved["held"]) < saved["threshold"]:
        raise SecAggError(
            f"secure aggregation: shares from {len(saved['held'])} sites, fewer than the threshold "
            f"{saved['threshold']}; this site sends no masked vector"
        )
    _save(state, saved)


def session_sites(state: RecordDict, session: str) -> int:
    """How many sites session ``session`` was opened with (the most whose vectors are summed)."""
    return int(_load(state, session)["sites"])


def mask(state: RecordDict, session: str, label: str, vector: np.ndarray) -> np.ndarray:
    """Step 3: ``vector`` (uint32) plus its self-mask and the pairwise masks with every site that
    gave this one its shares. Once per label and session."""
    saved = _load(state, session)
    if label not in saved["labels"] or label in saved["masked"]:
        raise SecAggError(
            f"secure aggregation: label {label!r} of session {session} was not set up or is spent"
        )
    if len(saved["held"]) < saved["threshold"]:
        raise SecAggError(
            f"secure aggregation: this site holds shares from {len(saved['held'])} sites, fewer than the "
            f"threshold {saved['threshold']}; it sends no masked vector"
        )
    me, count = saved["me"], int(vector.size)
    secret = saved["labels"][label]
    s_sk = bytes_to_private_key(_unb64(secret["s-sk"]))
    masked = vector.astype(np.uint32) + self_mask(_unb64(secret["b"]), session, label, count)
    for peer in sorted(int(i) for i in saved["held"]):
        if peer == me:
            continue
        shared = pair_secret(s_sk, _unb64(saved["peers"][str(peer)][label]))
        masked += signed_pair_mask(shared, session, label, me, peer, count)
    saved["masked"].append(label)
    _save(state, saved)
    return masked


def unmask_reply(config: ConfigRecord, state: RecordDict) -> dict[str, list]:
    """Step 4: shares of ``b`` for the active sites and of ``s_sk`` for the dropped ones, once per label."""
    label = str(config["label"])
    saved = _load(state, str(config["session"]))
    active, dropped = _ints(config, "active"), _ints(config, "dropped")
    held = {int(i) for i in saved["held"]}
    if label in saved["unmasked"]:
        raise SecAggError(f"secure aggregation: the shares for label {label!r} were already sent once")
    if set(active) & set(dropped) or not set(active) | set(dropped) <= held:
        raise SecAggError(
            "secure aggregation: a site is named both active and dropped, or holds no share here"
        )
    if len(active) < saved["threshold"]:
        raise SecAggError(
            f"secure aggregation: {len(active)} sites in the sum, fewer than the threshold "
            f"{saved['threshold']}; no share is sent, so nothing can be unmasked"
        )
    saved["unmasked"].append(label)
    _save(state, saved)
    reply: dict[str, list] = {}
    if active:
        reply["b-ids"] = active
        reply["b-shares"] = [_unb64(saved["held"][str(i)][label]["b"]) for i in active]
    if dropped:
        reply["sk-ids"] = dropped
        reply["sk-shares"] = [_unb64(saved["held"][str(i)][label]["sk"]) for i in dropped]
    return reply


def encode_update(vector: np.ndarray, clip: float) -> tuple[np.ndarray, int]:
    """Floats in ``[-clip, clip]`` as uint32 quantisation levels (Flower's stochastic ``quantize``),
    and how many entries were outside and were clipped."""
    clipped = int(np.count_nonzero(np.abs(vector) > clip))
    levels = quantize([np.asarray(vector, np.float64)], clip, QUANT_LEVELS)[0]
    return levels.astype(np.uint32), clipped
