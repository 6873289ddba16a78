"""A Raspberry Pi app that learns from the photos it collects and names new ones, with edge-ft's device API.

Labelled photos arrive in an inbox, one folder per class (a camera script, a web form, a sync job drops them
there): INBOX/<class name>/*.png|jpg. Photos to name arrive in INBOX/unlabelled/. Each time the app looks:

  1. new labelled photos are taken in arrival order, in small batches; every 5th goes to a rolling holdout
     (the newest HOLDOUT photos, never trained on), the rest to a replay buffer of recent examples;
  2. per batch it fine-tunes a few steps on the new photos plus a sample of the buffer, then scores the holdout;
  3. new unlabelled photos are named with the current weights (top 2 classes);
  4. the state is checkpointed into STATE/, with the list of photos already seen, so a restart goes on from there;
     the adapter and a merged model.onnx are exported for `edge-ft predict` or another device.

    python app.py kit/bundle --inbox inbox --state app-state --once      # look once and stop
    python app.py kit/bundle --inbox inbox --state app-state             # look every --poll seconds

Needs only the device install (`pip install 'edge_ft-*.whl[device,images]'`): numpy, onnxruntime, pillow.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_ft.atomic import atomic_write_json
from edge_ft.data.readers import IMAGE_SUFFIXES, read_image
from edge_ft.device import Trainer, UserError

UNLABELLED = "unlabelled"  # INBOX/unlabelled/: photos to name, not to learn from
SEEN = "seen.json"  # STATE/seen.json: photos already used, and the holdout and buffer they filled


@dataclass
class Memory:
    """What the app keeps between batches (and, through STATE/seen.json, between runs)."""

    holdout: int  # photos kept in the rolling holdout
    buffer: int  # photos kept in the replay buffer
    seen: set[str] = field(default_factory=set)  # inbox paths already used
    held: deque[tuple[str, int]] = field(default_factory=deque)  # (path, label) of the holdout
    replay: deque[tuple[str, int]] = field(default_factory=deque)  # (path, label) of the replay buffer
    count: int = 0  # labelled photos taken so far (every 5th goes to the holdout)

    def take(self, path: str, label: int) -> None:
        self.seen.add(path)
        self.count += 1
        target, size = (self.held, self.holdout) if self.count % 5 == 0 else (self.replay, self.buffer)
        target.append((path, label))
        while len(target) > size:
            target.popleft()

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"seen": sorted(self.seen), "held": list(self.held), "replay": list(self.replay),
                                 "count": self.count})

    @classmethod
    def load(cls, path: Path, holdout: int, buffer: int) -> Memory:
        memory = cls(holdout, buffer)
        if path.is_file():
            body = json.loads(path.read_text())
            memory.seen, memory.count = set(body["seen"]), body["count"]
            memory.held = deque((p, int(label)) for p, label in body["held"])
            memory.replay = deque((p, int(label)) for p, label in body["replay"])
        return memory


def photos(folder: Path) -> list[Path]:
    """Image files under `folder`, oldest first (arrival order), then by name."""
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))


def pixels(items: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([read_image(p) for p, _ in items]), np.array([label for _, label in items], np.int64)


def look(trainer: Trainer, inbox: Path, memory: Memory, args: argparse.Namespace,
         rng: np.random.Generator) -> list[str]:
    """One pass over the inbox: learn from new labelled photos, name new unlabelled ones; the lines to print."""
    classes = trainer.classes or []
    lines = []
    arrived = [(str(p), classes.index(p.parent.name)) for p in photos(inbox)
               if p.parent.name in classes and str(p) not in memory.seen]
    for start in range(0, len(arrived), args.batch):
        fresh = arrived[start : start + args.batch]
        for path, label in fresh:
            memory.take(path, label)
        trainable = [item for item in fresh if item in memory.replay]
        losses = []
        for _ in range(args.steps if memory.replay else 0):
            sample = rng.choice(len(memory.replay), min(args.batch, len(memory.replay)), replace=False)
            losses.append(trainer.step(*pixels(trainable + [memory.replay[i] for i in sample])))
        line = f"batch of {len(fresh)}: loss {np.mean(losses):.4f}" if losses else f"batch of {len(fresh)}"
        if memory.held:
            line += f", holdout accuracy {trainer.evaluate(*pixels(list(memory.held))).accuracy:.3f} " \
                    f"on {len(memory.held)}"
        lines.append(line)
    new = [p for p in photos(inbox / UNLABELLED) if str(p) not in memory.seen] if (inbox / UNLABELLED).is_dir() else []
    if new:
        for prediction in trainer.predict(new, top_k=2):
            memory.seen.add(prediction.input)
            guesses = "  ".join(f"{name} {p:.3f}" for name, _, p in prediction.top)
            lines.append(f"{prediction.input}  {guesses}")
    return lines


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle folder from `edge-ft export --classes ...`")
    parser.add_argument("--inbox", required=True, type=Path, help="INBOX/<class>/ photos, INBOX/unlabelled/")
    parser.add_argument("--state", required=True, type=Path, help="folder for the checkpoint, adapter and model")
    parser.add_argument("--batch", type=positive, default=8, help="photos per training batch (default 8)")
    parser.add_argument("--steps", type=positive, default=4, help="optimizer steps per batch (default 4)")
    parser.add_argument("--holdout", type=positive, default=30, help="photos in the rolling holdout (default 30)")
    parser.add_argument("--buffer", type=positive, default=200, help="photos in the replay buffer (default 200)")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between looks (default 30)")
    parser.add_argument("--once", action="store_true", help="look once, save, and stop")
    args = parser.parse_args(argv)
    try:
        checkpoint = args.state / "checkpoint"
        trainer = (Trainer.resume(args.bundle, checkpoint, threads=1) if (checkpoint / "checkpoint.json").is_file()
                   else Trainer(args.bundle, threads=1))
        if not trainer.classes:
            raise UserError(f"{args.bundle}: names no classes; export it with --classes so photos can be labelled")
        memory = Memory.load(args.state / SEEN, args.holdout, args.buffer)
        rng = np.random.default_rng(trainer.steps)  # a different sample after every restart, reproducible
        while True:
            lines = look(trainer, args.inbox, memory, args, rng)
            if lines:
                print("\n".join(lines), flush=True)
                trainer.save_checkpoint(checkpoint)
                memory.save(args.state / SEEN)
                trainer.export_adapter(args.state / "adapter", force=True)
                trainer.export_model(args.state / "model.onnx")
            if args.once:
                return 0
            time.sleep(args.poll)
    except UserError as e:
        print(f"app: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
