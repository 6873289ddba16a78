"""The whole story on one machine (`make demo`): pretrain, export, fine-tune under device limits, report, recommend.

  1. pretrain LeNet-5 on the MNIST 5k subset (cached under OUT/prep/)
  2. export every method for both ORT engines, and the task's data
  3. fine-tune every method x engine natively (`host`), as an emulated Raspberry Pi Zero 2 W and as a Pi 4
  4. OUT/results.jsonl, OUT/report.md with its plots, and the recommendation for the Zero 2 W
Every step is cached or recorded, so re-running resumes where it stopped and a finished demo re-prints in seconds.

Sizing (2 shared x86 cores, measured): pretraining ~20 s on an idle machine, exports ~45 s, the host runs ~50 s,
the Pi 4 ~60 s. The Zero 2 W sets the length: its quota gives a job 0.14 of a CPU, importing torch at that speed
takes two minutes, and at the 320 MB cap the torch runs spend twice the CPU time of an unconstrained run reclaiming
memory, so its three torch runs take 5-7 minutes even four runs at a time. Other boards: see --profiles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edge_ft.bench.measure import LABELS, SweepSettings
from edge_ft.contracts import ENGINES

DEMO_PROFILES = ("host", "rpi-zero-2w", "rpi-4b-2gb")
# 114 steps on mnist→digits: 1.2-2.5 points below the 20-epoch recipes (host, measured: full 0.968, probe 0.948,
# LoRA 0.960-0.965 against 0.956 / 0.930 / 0.940), in a sixth of the time.
DEMO_EPOCHS = 3
SMALL_BOARD = "rpi-zero-2w"


@dataclass(frozen=True)
class DemoSettings:
    out: Path = Path("runs/demo")  # results.jsonl, report.md, plots, prep/ and runs/ go here
    profiles: tuple[str, ...] = DEMO_PROFILES
    task: str = "mnist→digits"
    epochs: int = DEMO_EPOCHS
    pretrain_epochs: int | None = None  # None: the pretraining recipe
    timeout: float = 900.0  # per measured run
    host_speed: float | None = None  # this machine's core vs the reference (None: measured once, cached)
    timing: str = "cpu"  # an emulated board's time: its CPU time scaled (cpu) or paced by a CPU quota (quota)
    quiet: bool = False


def run_demo(s: DemoSettings) -> int:
    from edge_ft.advice.recommend import Constraints, recommend
    from edge_ft.bench.sweep import SweepOptions, plan, run_sweep, summarize
    from edge_ft.emulation.hostspeed import HostSpeed
    from edge_ft.emulation.profiles import load_profile
    from edge_ft.reports.report import write_report

    started = time.perf_counter()
    results = s.out / "results.jsonl"
    profiles = [load_profile(p) for p in s.profiles]
    if not s.quiet:
        print(f"edge-ft demo: fine-tune LeNet-5 on {s.task} with {', '.join(LABELS)} on the engines "
              f"{', '.join(ENGINES)}, measured as {', '.join(p.name for p in profiles)}; everything goes to "
              f"{s.out}/", flush=True)
    host = HostSpeed.resolve(s.host_speed, quiet=s.quiet)
    if not s.quiet:
        print(f"this machine's core: {host.describe()}; every board's time is scaled by it", flush=True)
    settings = SweepSettings(epochs=s.epochs, host_speed=host.speed, timing=s.timing)
    jobs = plan([s.task], list(LABELS), list(ENGINES), profiles, settings)
    records = run_sweep(jobs, results, SweepOptions(pretrain_epochs=s.pretrain_epochs, timeout=s.timeout,
                                                    quiet=s.quiet, host=host))
    report = write_report(records, s.out, source=str(results))
    board = next((p for p in profiles if p.name == SMALL_BOARD), profiles[-1])
    rec = recommend(records, board, jobs[0].task, Constraints())
    # The table and the recommendation are the demo's answer: printed even with --quiet.
    print(f"\n{summarize(records)}\n\nRecommendation (edge-ft recommend --profile {board.name} --results "
          f"{results}):\n" + "\n".join(rec.lines) + f"\n\nreport: {report} (plots beside it); results: {results}; "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return 0

