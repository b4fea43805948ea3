"""The ServerApp's grid (server/prompt_grid.py): replies collected as they come, the timeout kept,
everything else the wrapped grid's."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from server.prompt_grid import PromptGrid


def metadata(dst: int, message_type: str, group_id: str, reply_to: str = "") -> Metadata:
    return Metadata(
        run_id=1, message_id="", src_node_id=0, dst_node_id=dst, reply_to_message_id=reply_to,
        group_id=group_id, created_at=time.time(), ttl=3600.0, message_type=message_type,
    )  # fmt: skip


class DelayedReplies(Grid):
    """A grid whose node ``n`` answers ``delays[n]`` seconds after the push (None: never), as a
    SuperLink would hold the replies."""

    def __init__(self, delays: dict[int, float | None]):
        self.delays, self.pushed, self.pulls = delays, {}, 0
        self._run = Run.create_empty(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, metadata=metadata(dst_node_id, message_type, group_id))

    def get_node_ids(self) -> Iterable[int]:
        return list(self.delays)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{message.metadata.dst_node_id}"
            self.pushed[message.metadata.message_id] = (message, time.monotonic())
            ids.append(message.metadata.message_id)
        return ids

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("PromptGrid pushes and pulls itself; Flower's 3-s wait is what it replaces")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        replies = []
        for mid in message_ids:
            message, at = self.pushed[mid]
            delay = self.delays[message.metadata.dst_node_id]
            if delay is not None and time.monotonic() >= at + delay:
                replies.append(
                    Message(
                        RecordDict({"ok": ConfigRecord({"node": message.metadata.dst_node_id})}),
                        reply_to=message,
                    )
                )
        return replies


def messages(grid: Grid) -> list[Message]:
    return [grid.create_message(RecordDict(), "train", node, "1") for node in grid.get_node_ids()]


def test_replies_are_collected_soon_after_the_last_one_arrives():
    inner = DelayedReplies({1: 0.1, 2: 0.4})
    grid = PromptGrid(inner, interval=0.05)
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(messages(grid), timeout=30))
    elapsed = time.monotonic() - t0
    assert sorted(r.content["ok"]["node"] for r in replies) == [1, 2]
    assert 0.4 <= elapsed < 1.5  # Flower's deployment grid would take 3 s (it sleeps 3 s between pulls)
    assert inner.pulls >= 3


def test_a_node_that_never_answers_leaves_the_others_at_the_timeout():
    grid = PromptGrid(DelayedReplies({1: 0.0, 2: None}), interval=0.05)
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(messages(grid), timeout=0.3))
    assert [r.content["ok"]["node"] for r in replies] == [1]
    assert 0.3 <= time.monotonic() - t0 < 1.5


def test_everything_else_is_the_wrapped_grids():
    inner = DelayedReplies({3: 0.0, 5: 0.0})
    grid = PromptGrid(inner)
    run = Run.create_empty(9)
    grid.set_run(run)
    assert grid.run is run and inner.run is run
    assert list(grid.get_node_ids()) == [3, 5] and [n.node_id for n in grid.get_nodes()] == [3, 5]
    ids = list(grid.push_messages(messages(grid)))
    assert sorted(r.content["ok"]["node"] for r in grid.pull_messages(ids)) == [3, 5]
