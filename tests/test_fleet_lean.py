"""The fleet's lighter use of Flower: the per-message ClientApp and the SuperExec started from their own files
(without the SuperNode's server stack), and a ServerApp grid that collects replies without 3-second waits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from edge_ft.fleet.grid import PromptGrid
from edge_ft.fleet.lean_entry import COMMANDS, MODULE, write_shims
from edge_ft.fleet.processes import role_of
from edge_ft.interpreters import find_device_python

DEVICE_PYTHON = Path(find_device_python())
needs_device_flwr = pytest.mark.skipif(not (DEVICE_PYTHON.parent / "flower-supernode").exists(),
                                       reason="the device venv has no flwr (make device-venv)")
SERVER_STACK = ("sqlalchemy", "alembic", "uvicorn")  # what flower-supernode's server needs and a ClientApp does not


@needs_device_flwr
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_lean_entry_loads_flowers_function_without_the_server_stack(command):
    probe = (f"import sys; from edge_ft.fleet.lean_entry import load; f = load({command!r}); "
             f"print(f.__module__, f.__name__, [m for m in {SERVER_STACK!r} if m in sys.modules])")
    done = subprocess.run([str(DEVICE_PYTHON), "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    package, file, function = COMMANDS[command]
    assert done.stdout.split() == [f"{package}.{file[:-3].replace('/', '.')}", function, "[]"]
    # the console script's way in does import them: the comparison is real
    heavy = f"import sys, {package}.cli; print([m for m in {SERVER_STACK!r} if m in sys.modules])"
    full = subprocess.run([str(DEVICE_PYTHON), "-c", heavy], capture_output=True, text=True, timeout=120)
    assert full.returncode == 0 and full.stdout.strip() != "[]", full.stderr


@needs_device_flwr
def test_shims_run_flowers_own_argument_parsers(tmp_path):
    folder = write_shims(tmp_path / "bin with space", DEVICE_PYTHON)
    for command in COMMANDS:
        done = subprocess.run([str(folder / command), "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: {command} ")  # Flower's parser, named as Flower names it
    bad = subprocess.run([str(DEVICE_PYTHON), "-m", MODULE, "flwr-nothing"], capture_output=True, text=True)
    assert bad.returncode != 0 and "usage:" in bad.stderr and "Traceback" not in bad.stderr


def test_processes_started_by_a_shim_are_told_apart():
    lean = ["/venv/bin/python", "-m", MODULE]
    assert role_of(lean + ["flwr-clientapp", "--runtime-api-address", "127.0.0.1:9094"]) == "clientapp"
    assert role_of(lean + ["flower-superexec", "--insecure"]) == "superexec"
    assert role_of(["/venv/bin/python", "/venv/bin/flower-supernode", "--superlink", "x"]) == "supernode"


class SlowGrid:
    """A grid whose replies show up one pull at a time, or never (lost)."""

    def __init__(self, answered: int):
        self.answered, self.pulls, self.pushed = answered, 0, []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [f"id-{i}" for i in range(len(self.pushed))]

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = [f"id-{i}" for i in range(min(self.pulls, self.answered))]
        return [Message(RecordDict(), reply_to=self._sent(i)) for i in ready if i in message_ids]

    def _sent(self, message_id):
        msg = self.pushed[int(message_id.split("-")[1])]
        msg.metadata.__dict__["_message_id"] = message_id  # what the SuperLink assigns on push
        return msg


class FakeClock:
    """time.monotonic and time.sleep for PromptGrid: a sleep moves the clock, so the count of pulls is exact."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_prompt_grid_collects_every_reply_and_gives_up_at_the_timeout(monkeypatch):
    monkeypatch.setattr("edge_ft.fleet.grid.time", FakeClock())
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    messages = [Message(RecordDict(), dst_node_id=10 + i, message_type="train") for i in range(3)]
    inner = SlowGrid(answered=3)
    replies = PromptGrid(inner, poll=0.0).send_and_receive(messages, timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id-0", "id-1", "id-2"]
    assert inner.pulls == 3  # one reply per pull here: it kept pulling until the last one, then stopped
    lost = SlowGrid(answered=1)
    replies = PromptGrid(lost, poll=0.25).send_and_receive(list(messages), timeout=1.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["id-0"]
    assert lost.pulls == 5  # at 0, 0.25, 0.5, 0.75 and 1.0 s of the fake clock, then the timeout ends it


def test_a_node_message_belongs_to_the_round_the_server_started_before_it_arrived():
    """The ServerApp's streamed round line can reach the host after a quick node already took the message: the
    round is told by when the server started it, not by that line."""
    from edge_ft.fleet.processes import SuperNode

    node = SuperNode.__new__(SuperNode)
    node.events = [(10.5, "receive", None, "train"), (12.0, "send", None, "train"),  # stream said nothing yet
                   (20.4, "receive", 1, "train"), (23.4, "send", 2, "train"),  # stream still on round 1
                   (30.2, "receive", 2, "train")]  # killed before it answered
    assert node.round_seconds([(10.0, 1), (20.0, 2), (30.0, 3)]) == {1: 1.5, 2: 3.0}
    assert node.round_seconds() == {1: 3.0}  # the stream's labels alone lose round 1 and misfile round 2
