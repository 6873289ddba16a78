"""Devices as they are, for the simulated fleet: which board each device is, whether it is online this round, whether
the method and batch fit its memory, how long its round takes and what it does at the round's deadline.

Everything here is simulated time from models, never real sleeping (the host does the device's work at its own
speed with the real engine; this module says how long the board would have taken):

  board       each device draws a board from the fleet mix ("60%rpi-zero-2w,30%rpi-4b-2gb,10%rpi-5-4gb"): exact
              counts (largest remainders), dealt to the devices in a permutation seeded by the run's seed.
  step time   cost-model FLOPs of one training step (edge_ft.costmodel, at the batch) / (RATE[method] x the board's
              cpu_speed x thread_speedup(threads)): RATE is the effective GFLOP/s one reference core achieved for
              the ort-step engine on emulated boards (`make demo`, 2026-11-29: the constants of the bench's
              prediction model), cpu_speed the board's calibrated or estimated speed (device_profiles/).
  link        bytes down and up over LINK_MBPS (the board's Wi-Fi in practice), in seconds.
  memory      CLIENT_STACK_MB (what the fleet's client stack, SuperNode + SuperExec + ClientApp with flwr, numpy and
              onnxruntime, held on a Zero 2 W in `make fleet-demo`) + the cost model's training memory (weights,
              gradients, optimizer state, activations) at the batch; a device whose budget_mb is below it does not
              fit: it is never sent the model and is counted as such.
  online      the availability trace, per device and round, seeded:
                always            every device, every round
                random:P          each device online with probability P, independently each round
                diurnal:LOW-HIGH  online probability following the device's local time of day: HIGH at 02:00
                                  (charging, idle, on Wi-Fi: when phones and boards train in practice), LOW at 14:00,
                                  a cosine between; each device has its own time zone offset (uniform over 24 h), and
                                  a round advances the clock by ROUND_HOURS
  deadline    seconds a round waits (0: none). drop: a device whose round (download + steps + upload) exceeds it is
              dropped, its update never averaged (its work is wasted, as on a real fleet); partial: each device is
              told how many steps fit in the deadline at its board's speed and sends that partial update (a device
              where not even one step fits is dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edge_ft.config import MethodConfig
from edge_ft.costmodel import estimate
from edge_ft.emulation.profiles import MB, DeviceProfile, load_profile
from edge_ft.errors import UserError

RATE = {"full": 4.79, "probe": 5.54, "lora": 4.45}  # effective GFLOP/s per reference core, ort-step, emulated boards
CLIENT_STACK_MB = 240.0  # the client stack's PSS on a Zero 2 W node, `make fleet-demo` (240-266 MiB measured)
LINK_MBPS = 10.0  # default link speed, megabits per second, both ways
ROUND_HOURS = 1.0  # simulated clock per round under a diurnal trace
STRAGGLERS = ("drop", "partial")
DEFAULT_MIX = "60%rpi-zero-2w,30%rpi-4b-2gb,10%rpi-5-4gb"


def parse_mix(text: str) -> list[tuple[str, float]]:
    """'60%rpi-zero-2w,40%rpi-4b-2gb' -> [(profile, share)], shares summing to 1 (a bare name is 100%)."""
    items = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        share, sep, name = part.partition("%")
        try:
            items.append((name.strip(), float(share)) if sep else (part, 100.0))
        except ValueError:
            raise UserError(f"fleet mix {text!r}: expected PERCENT%PROFILE,... (e.g. {DEFAULT_MIX})") from None
    total = sum(s for _, s in items)
    if not items or any(s <= 0 for _, s in items) or not math.isclose(total, 100.0, abs_tol=1e-6):
        raise UserError(f"fleet mix {text!r}: shares must be positive and add up to 100%")
    for name, _ in items:
        load_profile(name)  # an unknown board fails here, with the profile loader's message
    return [(name, share / 100.0) for name, share in items]


def deal_boards(mix: str, num_devices: int, seed: int) -> list[str]:
    """The board of each device: exact counts by largest remainders, dealt in a seeded order."""
    items = parse_mix(mix)
    quotas = [share * num_devices for _, share in items]
    counts = [int(q) for q in quotas]
    for i in sorted(range(len(items)), key=lambda i: quotas[i] - counts[i], reverse=True)[:num_devices - sum(counts)]:
        counts[i] += 1
    boards = [name for (name, _), n in zip(items, counts) for _ in range(n)]
    return [boards[i] for i in np.random.default_rng([seed, 7]).permutation(num_devices)]


def parse_availability(text: str) -> tuple[str, float, float]:
    """'always' | 'random:P' | 'diurnal:LOW-HIGH' -> (kind, low, high)."""
    kind, _, arg = text.partition(":")
    try:
        if kind == "always" and not arg:
            return kind, 1.0, 1.0
        if kind == "random":
            p = float(arg)
            if 0 < p <= 1:
                return kind, p, p
        if kind == "diurnal":
            low, high = (float(v) for v in arg.split("-"))
            if 0 <= low <= high <= 1 and high > 0:
                return kind, low, high
    except ValueError:
        pass
    raise UserError(f"availability {text!r}: choose always, random:P (0<P<=1) or diurnal:LOW-HIGH (0<=LOW<=HIGH<=1)")


def online(text: str, num_devices: int, round_: int, seed: int) -> np.ndarray:
    """Which devices are online in `round_` (bool per device), by the availability trace."""
    kind, low, high = parse_availability(text)
    if kind == "always":
        return np.ones(num_devices, dtype=bool)
    draw = np.random.default_rng([seed, 11, round_]).random(num_devices)
    if kind == "random":
        return draw < low
    zones = np.random.default_rng([seed, 13]).random(num_devices) * 24.0
    hour = (zones + round_ * ROUND_HOURS) % 24.0
    p = low + (high - low) * (1 + np.cos(2 * np.pi * (hour - 2.0) / 24.0)) / 2
    return draw < p


@dataclass(frozen=True)
class BoardCost:
    """What one round of training costs a board."""

    board: str  # device profile name
    step_seconds: float  # simulated seconds per optimizer step
    memory_mb: float  # predicted peak memory of the client stack training
    budget_mb: float  # the board's memory budget
    fits: bool  # memory_mb <= budget_mb


@lru_cache(maxsize=64)
def board_cost(board: str, method: str, batch: int, rank: int, num_classes: int, ffa: bool) -> BoardCost:
    profile: DeviceProfile = load_profile(board)
    est = estimate(MethodConfig(method, rank=rank, num_classes=num_classes, freeze_lora_a=ffa), batch, "adamw")
    speed = profile.cpu_speed * profile.thread_speedup(profile.threads)
    step = est.flops["total"] / (RATE[method] * 1e9 * speed)
    memory = CLIENT_STACK_MB + est.memory["total"] / MB
    return BoardCost(board, step, round(memory, 1), float(profile.budget_mb), memory <= profile.budget_mb)


def link_seconds(nbytes: int, mbps: float) -> float:
    return nbytes * 8 / (mbps * 1e6)


def steps_within(deadline: float, cost: BoardCost, bytes_down: int, bytes_up: int, mbps: float) -> int:
    """Optimizer steps a board finishes within `deadline` after downloading and before uploading (0: none)."""
    left = deadline - link_seconds(bytes_down + bytes_up, mbps)
    return max(0, int(left // cost.step_seconds)) if left > 0 else 0


def round_seconds(cost: BoardCost, steps: int, bytes_down: int, bytes_up: int, mbps: float) -> float:
    """A device's simulated round: download, its steps, upload."""
    return link_seconds(bytes_down + bytes_up, mbps) + steps * cost.step_seconds


@dataclass(frozen=True)
class DeviceModel:
    """The simulated devices of one run, as the ServerApp sees them (settings from the run config)."""

    mix: str  # fleet mix (parse_mix)
    availability: str  # availability trace (parse_availability)
    deadline: float  # simulated seconds a round waits (0: none)
    stragglers: str  # drop | partial
    link_mbps: float  # link speed, both ways
    seed: int  # boards, availability
    method: str  # what the devices train
    batch: int  # examples per step
    rank: int  # LoRA rank (cost model)
    num_classes: int  # classes of the head (cost model)
    ffa: bool  # LoRA with lora_A frozen

    def __post_init__(self):
        parse_mix(self.mix)
        parse_availability(self.availability)
        if self.stragglers not in STRAGGLERS or not self.deadline >= 0 or not self.link_mbps > 0:
            raise UserError(f"stragglers must be one of {', '.join(STRAGGLERS)}, the deadline >= 0 s and the link "
                            "speed positive")

    def boards(self, node_ids: list[int]) -> dict[int, str]:
        """Board of each node: devices in node-id order get deal_boards' boards."""
        ordered = sorted(node_ids)
        return dict(zip(ordered, deal_boards(self.mix, len(ordered), self.seed)))

    def online_nodes(self, node_ids: list[int], round_: int) -> list[int]:
        ordered = sorted(node_ids)
        up = online(self.availability, len(ordered), round_, self.seed)
        return [n for n, on in zip(ordered, up) if on]

    def cost(self, board: str) -> BoardCost:
        return board_cost(board, self.method, self.batch, self.rank, self.num_classes, self.ffa)

    def step_cap(self, board: str, nbytes: int) -> int | None:
        """Steps a device may run under partial work (None: no cap); 0: not one step fits the deadline."""
        if self.stragglers != "partial" or not self.deadline:
            return None
        return steps_within(self.deadline, self.cost(board), nbytes, nbytes, self.link_mbps)

    def settle(self, board: str, steps: int, bytes_down: int, bytes_up: int) -> tuple[float, str | None]:
        """(simulated seconds of the device's round, why it is dropped or None)."""
        seconds = round_seconds(self.cost(board), steps, bytes_down, bytes_up, self.link_mbps)
        if self.deadline and seconds > self.deadline * (1 + 1e-9):
            return seconds, f"past the {self.deadline:g} s deadline ({seconds:.1f} s on {board})"
        return seconds, None

    def describe(self) -> dict:
        """The device model's settings and per-board costs, for the run's records."""
        boards = {name: self.cost(name).__dict__ for name, _ in parse_mix(self.mix)}
        return {"fleet_mix": self.mix, "availability": self.availability, "deadline": self.deadline,
                "stragglers": self.stragglers, "link_mbps": self.link_mbps, "boards": boards}
