"""The training loop's bookkeeping: the progress bar, one step's record, and the checkpoint an interrupt leaves.

Split from edge_ft.device.trainer so the loop reads as its phases; the records go into edge_ft.device.resume's
Progress, which a checkpoint stores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

from edge_ft.device.resume import Progress, save_checkpoint


class ProgressBar:
    """tqdm when it is installed (host installs), a line per epoch otherwise (tqdm is not a device dependency)."""

    def __init__(self, total: int, quiet: bool, done: int = 0):
        self.bar, self.quiet = None, quiet
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def step(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def epoch(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepDone(NamedTuple):
    """One finished optimizer step, as Progress records it: the counts after it and what it measured."""

    step: int
    batch: int
    loss: float
    seconds: float
    hits: int
    seen: int


def record_step(pos: Progress, done: StepDone) -> None:
    """Add `done` to `pos`; applying it again changes nothing, so a record cut short can be completed."""
    if len(pos.losses) < done.step:
        pos.losses.append(done.loss)
    if len(pos.step_seconds) < done.step:
        pos.step_seconds.append(done.seconds)
    if len(pos.epoch_losses) < done.batch:
        pos.epoch_losses.append(done.loss)
    pos.hits, pos.seen, pos.batch, pos.step = done.hits, done.seen, done.batch, done.step


def next_epoch(pos: Progress) -> None:
    """Start the epoch after the last logged one; pos.epoch is set last, so a start cut short is redone whole."""
    pos.batch, pos.epoch_losses, pos.epoch_seconds, pos.hits, pos.seen = 0, [], 0.0, 0, 0
    pos.epoch = len(pos.epoch_log)


class CheckpointOnInterrupt:
    """Save a checkpoint when training stops on a BaseException that is not an Exception (Ctrl-C, SystemExit, the
    exception a signal handler raises), say so in one line, and let it propagate. Errors (Exception) save nothing:
    their state may be what went wrong. The engine's state is whole between its steps; a step whose record was
    cut short is completed first (pending), so the checkpoint and the progress it names agree."""

    def __init__(self, engine: Any, out: Path, identity: dict[str, Any], pos: Progress, keep: int,
                 progress: ProgressBar, started: float):
        self.engine, self.out, self.identity, self.pos, self.keep = engine, out, identity, pos, keep
        self.progress, self.started = progress, started  # perf_counter of step 0, earlier processes included
        self.pending: StepDone | None = None  # the step being recorded
        self.epoch_started: float | None = None  # perf_counter of the epoch in progress's start

    def __enter__(self) -> CheckpointOnInterrupt:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if kind is None or issubclass(kind, Exception):
            return False
        self.progress.close()
        pos, now = self.pos, time.perf_counter()
        if self.pending is not None:
            record_step(pos, self.pending)
        if len(pos.epoch_log) > pos.epoch:  # an epoch was logged; the next had not started
            next_epoch(pos)
        elif self.epoch_started is not None:
            pos.epoch_seconds = now - self.epoch_started
        pos.train_seconds = now - self.started
        try:
            save_checkpoint(self.engine, self.out, self.identity, pos, self.keep)
        except Exception as e:  # the interrupt is what the user must see; say why nothing was saved
            print(f"interrupted at step {pos.step}: no checkpoint saved ({e})", file=sys.stderr, flush=True)
            return False
        print(f"interrupted at step {pos.step}: checkpoint saved; add --resume to continue", file=sys.stderr,
              flush=True)
        return False
