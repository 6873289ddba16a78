"""An in-process Flower Grid for tests: each node is a Context handed to the ClientApp, messages go by call.

Grid is Flower's public ABC for what a ServerApp talks to; this one runs every node's ClientApp in this process,
sets the process identity Flower's runtime would, gives each node its own copy of a message's content (Flower's
messages share one RecordDict among nodes; a transport would copy it), turns a ClientApp exception into an error reply (as a SuperNode does), and lets a test corrupt or drop a node's
reply to play a broken or dead device, or forge what a node receives to play an attacker between server and node.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 0  # Flower's SuperLink-side node id of a ServerApp


class LocalGrid(Grid):
    def __init__(self, client_app, node_configs: list[dict], run_config: dict | None = None,
                 tamper: Callable[[int, Message], Message | None] | None = None,
                 forge: Callable[[int, Message], RecordDict | None] | None = None):
        self.app, self.tamper, self.forge = client_app, tamper, forge
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config=dict(cfg), state=RecordDict(),
                                          run_config=dict(run_config or {}))
                         for i, cfg in enumerate(node_configs)}
        self.sent: list[Message] = []  # every message the server sent, in order
        self.replies: list[Message] = []  # every reply that reached the server, in order
        self.received: list[Message] = []  # every message a node received (forged ones included), in order
        self._run = None
        # What Flower's runtime sets in a ServerApp process before it builds messages (run, node and task ids).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError("LocalGrid answers in send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("LocalGrid answers in send_and_receive")

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.content = copy.deepcopy(msg.content)  # each node gets its own, as through a transport
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            forged = self.forge(node, msg) if self.forge is not None else None
            if forged is not None:  # the node gets other content under the server's message
                msg = Message(forged, node, msg.metadata.message_type, group_id=msg.metadata.group_id)
            self.received.append(msg)
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as e:  # a SuperNode reports a failed ClientApp as an error reply
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            if reply is not None:  # None: the device died, no reply arrives before the timeout
                self.replies.append(reply)
                replies.append(reply)
        return replies
