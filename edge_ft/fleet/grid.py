"""The ServerApp's grid, polling for replies often: what a round waits for is the devices, not the poll.

Flower's runtime grid (HttpGrid) pushes a round's messages and then pulls the replies every 3 s, so each round
ends on average 1.5 s after its last reply arrived. PromptGrid wraps whatever grid Flower hands the ServerApp and
does the same push-then-pull with a short pause; each pull is one request to the SuperLink.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

REPLY_POLL = 0.25  # seconds between pulls while replies are outstanding


class PromptGrid(Grid):
    """`grid` with send_and_receive polling every `poll` seconds; everything else is passed through."""

    def __init__(self, grid: Grid, poll: float = REPLY_POLL):
        self.grid, self.poll = grid, poll

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push `messages`, then pull until each has its reply or `timeout` seconds have passed (None: wait)."""
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self.pull_messages(pending))
            replies += arrived
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll)
        return replies
