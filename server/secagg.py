"""The server's side of secure aggregation (:mod:`common.secagg`): it relays, then learns only sums.

One :class:`SecureSession` per round (``train`` and ``evaluate`` labels) or per final test
(``evaluate``): :meth:`SecureSession.open` runs the keys and shares steps, :meth:`attach` puts
each site's relayed ciphertexts on its training or evaluation message, :meth:`reveal` runs the
unmask step and returns the sum of the masked vectors that came. A site that drops after the
shares step is left out of the sum (its pairwise masks are removed with the other sites' shares of
its key); with fewer than ``threshold`` sites left :class:`SecAggError` is raised and nothing is
learned (the sites refuse to send shares, and the server could not combine fewer anyway).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key

from common.secagg import SecAggError, pair_secret, self_mask, signed_pair_mask, threshold_for

log = logging.getLogger("onfh.server")

Failure = Callable[[int, str, str], None]  # (node id, step, reason): the strategy records it
Tally = Callable[[str, int, Message], None]  # (key such as "secagg-keys-sent", node id, message): bytes


@dataclass
class SecureSession:
    """One session's public state at the server: numbers, public keys, who is still in."""

    grid: Grid
    timeout: float
    on_failure: Failure
    labels: list[str]
    tally: Tally = lambda key, node, msg: None
    session: str = field(default_factory=lambda: secrets.token_hex(8))
    ids: dict[int, int] = field(default_factory=dict)  # node id -> site number (1..N)
    threshold: int = 0
    s_pk: dict[str, dict[int, bytes]] = field(default_factory=dict)  # label -> site number -> public key
    shared: list[int] = field(default_factory=list)  # nodes whose shares were relayed (U2)
    relay: dict[int, tuple[list[int], list[bytes]]] = field(
        default_factory=dict
    )  # node -> (from, ciphertexts)
    revealed: list[str] = field(default_factory=list)

    # -- steps -----------------------------------------------------------------------------
    def _ask(
        self, nodes: list[int], step: str, per_node: Callable[[int], dict], tag: str = ""
    ) -> dict[int, ConfigRecord]:
        """Send one query per node; the ``secagg`` records of the sound replies, by node. Bytes are
        tallied under ``secagg-STEP[-TAG]-sent`` / ``-received`` (tag: the label of an unmask step)."""
        key = f"secagg-{step}" + (f"-{tag}" if tag else "")
        messages = [
            Message(
                RecordDict({"config": ConfigRecord({"query": f"secagg-{step}", **per_node(node)})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in nodes
        ]
        for msg in messages:
            self.tally(f"{key}-sent", msg.metadata.dst_node_id, msg)
        answers = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids set when pushed
        replies: dict[int, ConfigRecord] = {}
        failed: set[int] = set()
        for reply in answers:
            node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_content():
                self.tally(f"{key}-received", node, reply)
            if reply.has_error():
                failed.add(node)
                self.on_failure(node, key, reply.error.reason)
            elif "secagg" not in reply.content.config_records:
                failed.add(node)
                self.on_failure(node, key, "reply carries no 'secagg' record")
            else:
                replies[node] = reply.content.config_records["secagg"]
        for node in sorted(set(nodes) - set(replies) - failed):
            self.on_failure(node, key, "no reply before the round timeout")
        return replies

    def _require(self, count: int, step: str) -> None:
        if count < self.threshold:
            raise SecAggError(
                f"secure aggregation session {self.session}: {count} sites left at the {step} step, "
                f"fewer than the threshold {self.threshold}; the round reveals nothing"
            )

    def open(self, nodes: list[int]) -> SecureSession:
        """Keys and shares steps with ``nodes``; afterwards :attr:`shared` lists the sites that can take part."""
        self.ids = {node: k + 1 for k, node in enumerate(sorted(nodes))}
        self.threshold = threshold_for(len(nodes))
        base = {
            "session": self.session,
            "sites": len(nodes),
            "threshold": self.threshold,
            "labels": self.labels,
        }
        keys = self._ask(sorted(nodes), "keys", lambda node: {**base, "id": self.ids[node]})
        keyed = sorted(keys)
        self._require(len(keyed), "keys")
        self.s_pk = {
            label: {self.ids[n]: bytes(keys[n][f"s-pk-{label}"]) for n in keyed} for label in self.labels
        }
        listing = {
            "session": self.session,
            "ids": [self.ids[n] for n in keyed],
            "c-pk": [bytes(keys[n]["c-pk"]) for n in keyed],
            **{f"s-pk-{label}": [self.s_pk[label][self.ids[n]] for n in keyed] for label in self.labels},
        }
        shares = self._ask(keyed, "shares", lambda node: listing)
        self.shared = sorted(shares)
        self._require(len(self.shared), "shares")
        by_number = {self.ids[n]: n for n in self.shared}
        self.relay = {node: ([], []) for node in self.shared}
        for src in self.shared:
            for dst_number, ciphertext in zip(
                [int(v) for v in shares[src]["to"]], list(shares[src]["ciphertexts"]), strict=True
            ):
                dst = by_number.get(dst_number)
                if dst is not None:
                    self.relay[dst][0].append(self.ids[src])
                    self.relay[dst][1].append(bytes(ciphertext))
        log.info(
            "secure aggregation session %s: %d of %d sites keyed and shared (threshold %d)",
            self.session,
            len(self.shared),
            len(nodes),
            self.threshold,
        )
        return self

    def attach(self, messages: list[Message], label: str, extra: dict | None = None) -> list[Message]:
        """The messages to the session's sites, each with its own ``secagg`` record: the shares the
        other sites sent it ride on every masked step (a site that failed its training message can
        still mask its evaluation); others are left out."""
        attached = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.relay:
                continue
            record = {"session": self.session, "label": label, **(extra or {})}
            sources, ciphertexts = self.relay[node]
            if sources:
                record.update({"from": sources, "ciphertexts": ciphertexts})
            content = RecordDict({key: value for key, value in msg.content.items()})
            content["secagg"] = ConfigRecord(record)
            attached.append(Message(content, dst_node_id=node, message_type=msg.metadata.message_type))
        return attached

    def reveal(self, label: str, masked: dict[int, np.ndarray]) -> np.ndarray:
        """The sum of the vectors of the nodes in ``masked`` (all uint32 of one length), once per label.

        Raises:
            SecAggError: fewer than ``threshold`` vectors, or fewer than ``threshold`` sites sent shares.
        """
        if label in self.revealed:
            raise SecAggError(
                f"secure aggregation session {self.session}: label {label!r} was revealed already"
            )
        self.revealed.append(label)
        active = sorted(n for n in masked if n in self.relay)
        dropped = sorted(set(self.shared) - set(active))
        self._require(len(active), f"{label} masked-input")
        request = {
            "session": self.session,
            "label": label,
            "active": [self.ids[n] for n in active],
            **({"dropped": [self.ids[n] for n in dropped]} if dropped else {}),
        }
        replies = self._ask(active, "unmask", lambda node: request, tag=label)
        self._require(len(replies), f"{label} unmask")
        b_shares: dict[int, list[bytes]] = {}
        sk_shares: dict[int, list[bytes]] = {}
        for record in replies.values():
            for key, store in (("b", b_shares), ("sk", sk_shares)):
                if f"{key}-ids" in record:
                    for number, share in zip(record[f"{key}-ids"], record[f"{key}-shares"], strict=True):
                        store.setdefault(int(number), []).append(bytes(share))
        count = int(next(iter(masked.values())).size)
        total = np.zeros(count, np.uint32)
        for node in active:
            number = self.ids[node]
            total += masked[node].astype(np.uint32)
            total -= self_mask(self._combine(b_shares, number, "b"), self.session, label, count)
        for node in dropped:
            number = self.ids[node]
            s_sk = bytes_to_private_key(self._combine(sk_shares, number, "sk"))
            for other in active:
                peer = self.ids[other]
                shared = pair_secret(s_sk, self.s_pk[label][peer])
                total -= signed_pair_mask(shared, self.session, label, peer, number, count)
        if dropped:
            log.warning(
                "secure aggregation session %s %s: %d site(s) dropped after masking began; their masks "
                "were removed with the others' shares",
                self.session,
                label,
                len(dropped),
            )
        return total

    def _combine(self, shares: dict[int, list[bytes]], number: int, kind: str) -> bytes:
        got = shares.get(number, [])
        if len(got) < self.threshold:
            raise SecAggError(
                f"secure aggregation session {self.session}: {len(got)} shares of site {number}'s {kind}, "
                f"fewer than the threshold {self.threshold}"
            )
        return combine_shares(got[: self.threshold])
