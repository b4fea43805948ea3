"""Flower's grid with replies collected promptly: the ServerApp's side of a round's latency."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

REPLY_POLL_S = 0.1  # as Flower's simulation grid: one small request to the SuperLink while replies are due


class PromptGrid(Grid):
    """``grid`` (any Flower grid) whose ``send_and_receive`` looks for replies every ``interval`` seconds.

    Flower 1.42's deployment grid (``flwr.superlink.grid.HttpGrid``) sleeps a fixed 3 s between
    pulls, so every message step of a round (a secure-aggregation round has about eight) ended up
    to 3 s after its last reply had arrived. Its simulation grid pulls every 0.1 s. Everything else
    is the wrapped grid's own."""

    def __init__(self, grid: Grid, interval: float = REPLY_POLL_S):
        self.grid, self.interval = grid, interval

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all came or ``timeout`` seconds passed."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(
                self.interval
                if deadline is None
                else max(0.0, min(self.interval, deadline - time.monotonic()))
            )
        return replies
