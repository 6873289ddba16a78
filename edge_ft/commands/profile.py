"""`edge-ft profile`: list and show device profiles, calibrate this CPU, run a command as a profile's device."""

from __future__ import annotations

import json
import sys

from edge_ft.commands.argtypes import int_at_least, positive_float
from edge_ft.commands.bench import DEFAULT_TIMING, add_host_speed_option, add_timing_option
from edge_ft.errors import UserError
from edge_ft.reports.format import text_table


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile",
        help="device profiles: list, show, calibrate this CPU, run a command confined to a device",
        description="Device profiles describe a target board (cores, memory left to the application, per-core "
        "speed). Shipped profiles live in the package (edge_ft/emulation/device_profiles/); $EDGE_FT_PROFILES adds "
        "folders searched first.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="table of the known profiles",
                        description="One row per shipped device profile: cores, RAM, the memory budget left to the "
                        "application, threads and CPU speed against the reference core.")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=list_handler)

    show = sub.add_parser("show", help="every field of one profile",
                          description="Every field of a shipped profile or a .toml file, checked as `edge-ft train "
                          "--profile` and `edge-ft bench` read it.")
    show.add_argument("name", metavar="NAME|PATH", help="profile name (see `list`) or path to a .toml file")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=show_handler)

    cal = sub.add_parser(
        "calibrate", help="measure this CPU core against the reference core (the cpu_speed a profile wants)",
        description="Times a fixed single-threaded workload (numpy GEMM, a numpy LeNet-5 training step, an "
        "interpreter loop) in a child process and prints its speed relative to the reference core the shipped "
        "cpu_speed values use. Run it on the real board and write the figure into its profile. With --profile "
        "the workload runs confined to that profile, which shows how well the emulation matches it.")
    cal.add_argument("--repeats", type=int_at_least(1), default=3, metavar="N",
                     help="timed runs per part; the fastest counts (default 3)")
    cal.add_argument("--profile", metavar="NAME|PATH", help="run confined to this profile (check the emulation)")
    cal.add_argument("--mode", choices=("auto", "cgroup", "rlimit"), default="auto",
                     help="how to confine with --profile (default auto: cgroup, else rlimit)")
    add_host_speed_option(cal)
    cal.add_argument("--json", action="store_true", help="print JSON")
    cal.add_argument("--quiet", action="store_true", help="no progress message")
    cal.set_defaults(func=calibrate_handler)

    _add_check_parser(sub)

    run = sub.add_parser(
        "run", help="run a command confined to a profile and report time, peak memory and whether it fit",
        description="Runs COMMAND as the profile's device: memory capped at the profile's budget, cores and "
        "per-core speed limited through cgroups (else RLIMIT_DATA + CPU affinity), thread counts set. "
        "Example: edge-ft profile run rpi-3b -- edge-ft train BUNDLE --data d.npz --out runs/x")
    run.add_argument("name", metavar="NAME|PATH", help="profile name or path")
    run.add_argument("command", nargs="+", metavar="COMMAND", help="the command to run, after `--`")
    run.add_argument("--timeout", type=positive_float, metavar="S", help="kill the command after S seconds")
    run.add_argument("--mode", choices=("auto", "cgroup", "rlimit", "native"), default="auto",
                     help="how to impose the profile (default auto)")
    add_host_speed_option(run)
    add_timing_option(run, "quota")
    run.add_argument("--json", action="store_true", help="print the full result as JSON")
    run.set_defaults(func=run_handler)


def _add_check_parser(sub) -> None:
    chk = sub.add_parser(
        "check", help="measure how well this machine emulates each profile: speed, threads, memory cap",
        description="For every profile (or --profiles), runs the calibration workload confined to it and prints "
        "the speed it achieved against the profile's cpu_speed (goal: within 10%), the speed-up its threads get "
        "together against the profile's thread_scaling, and the largest allocation that survived its memory cap. "
        "This machine's speed and the quota correction are measured once and cached.")
    chk.add_argument("--profiles", default="all", metavar="P1,P2",
                     help="profiles to check (default all confined ones)")
    chk.add_argument("--cycles", type=int_at_least(1), default=5, metavar="N",
                     help="capped/uncapped cycles of the speed measurement per profile; the median counts "
                          "(default 5)")
    chk.add_argument("--mode", choices=("auto", "cgroup", "rlimit"), default="auto",
                     help="how to confine (default auto: cgroup, else rlimit)")
    add_host_speed_option(chk)
    chk.add_argument("--refresh", action="store_true", help="re-measure this machine's speed and quota correction")
    chk.add_argument("--no-memory", action="store_true", help="skip the memory-cap probe")
    chk.add_argument("--workload", choices=("speed", "train"), default="speed",
                     help="speed: the calibration workload, thread speed-up and memory cap (default); train: the "
                          "real training step of each --methods, --runs times per board, its spread and its ratio "
                          "to the profile's expectation")
    add_timing_option(chk, DEFAULT_TIMING, "--workload train (the speed workload checks the quota): ")
    chk.add_argument("--methods", default="full,probe,lora", metavar="M1,M2",
                     help="--workload train: methods whose ort-step step runs (default full,probe,lora)")
    chk.add_argument("--runs", type=int_at_least(2), default=3, metavar="N",
                     help="--workload train: runs per board, method and thread count (default 3)")
    chk.add_argument("--steps", type=int_at_least(1), default=30, metavar="N",
                     help="--workload train: timed steps per run (default 30)")
    chk.add_argument("--base", metavar="BASE.safetensors",
                     help="--workload train: base weights (default: pretrained once under --out)")
    chk.add_argument("--out", default="runs/check", metavar="DIR",
                     help="--workload train: folder for the base, bundles and each run's output (default runs/check)")
    chk.add_argument("--json", action="store_true", help="print JSON")
    chk.add_argument("--quiet", action="store_true", help="no progress lines")
    chk.set_defaults(func=check_handler)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MB"


def list_handler(args) -> int:
    from edge_ft.emulation.profiles import list_profiles

    profiles = list_profiles()
    if args.json:
        print(json.dumps([p.to_dict() for p in profiles], indent=2))
        return 0
    rows = [("name", "board", "arch", "cores", "RAM MB", "budget MB", "threads", "cpu_speed", "threads vs 1")]
    for p in profiles:
        speed = "native" if p.native else f"{p.cpu_speed:g} ({'est.' if p.cpu_speed_is_estimate else 'measured'})"
        together = "-" if p.native or p.threads == 1 else f"{p.thread_speedup(p.threads):.2f}x"
        rows.append((p.name, p.description, p.arch, str(p.cores), str(p.ram_mb), str(p.budget_mb), str(p.threads),
                     speed, together))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\ncpu_speed: one core relative to the reference core (edge-ft profile calibrate); est. = estimate; "
          "threads vs 1: how much faster the profile's threads go together than one (thread_scaling)")
    return 0


def show_handler(args) -> int:
    from edge_ft.emulation.profiles import load_profile

    p = load_profile(args.name)
    d = p.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    width = max(map(len, d))
    for key, value in d.items():
        print(f"{key.ljust(width)}  {value}")
    return 0


def calibrate_handler(args) -> int:
    from edge_ft.emulation.calibrate import PARTS, REFERENCE
    from edge_ft.emulation.emulate import run_confined
    from edge_ft.emulation.hostspeed import HostSpeed
    from edge_ft.emulation.profiles import load_profile

    profile = load_profile(args.profile or "host")
    mode = args.mode if args.profile else "native"
    host = HostSpeed.resolve(args.host_speed, quiet=args.quiet) if args.profile else HostSpeed.reference()
    if not args.quiet:
        print(f"timing the calibration workload ({args.repeats} runs of {len(PARTS)} parts, one thread"
              f"{', as ' + profile.name if args.profile else ''}) ...", file=sys.stderr, flush=True)
    # A free core is timed by CPU time (a busy neighbour is not the core's slowness); a board by wall time.
    argv = [sys.executable, "-m", "edge_ft.emulation.calibrate", "--repeats", str(args.repeats),
            "--clock", "wall" if args.profile else "cpu"]
    result = run_confined(argv, profile, mode=mode, threads=1, host=host)
    if result.status != "ok":
        last = (result.stderr_tail.strip().splitlines() or [result.status])[-1]
        raise UserError(f"the calibration workload did not finish ({result.status}: {last})")
    measured = json.loads(result.stdout_tail.strip().splitlines()[-1])
    measured["emulation"] = result.emulation
    if args.profile:
        measured["profile"] = {"name": profile.name, "cpu_speed": profile.cpu_speed, "notes": result.notes}
        measured["host"] = {**host.to_record(), "cpu_quota": result.cpu_quota,
                            "quota_efficiency": result.quota_efficiency}
    if args.json:
        print(json.dumps(measured, indent=2))
        return 0
    print(f"reference: {REFERENCE['machine']} (measured {REFERENCE['date']})")
    print(f"{'part':<12}{'seconds':>10}{'reference':>11}{'speed':>8}")
    for part in PARTS:
        print(f"{part:<12}{measured['seconds'][part]:>10.4f}{REFERENCE['seconds'][part]:>11.4f}"
              f"{measured['per_part'][part]:>8.3f}")
    speed = measured["speed"]
    if args.profile:
        print(f"cpu_speed under {profile.name} ({result.emulation}) = {speed:.3f}; the profile says "
              f"{profile.cpu_speed:g} ({speed / profile.cpu_speed:.2f}x). This machine: {host.describe()}"
              + (f"; quota {result.cpu_quota:.3g} of a CPU per thread, corrected for a measured throttling "
                 f"efficiency of {result.quota_efficiency:.2f}" if result.cpu_quota else ""))
        for note in result.notes:
            print(f"note: {note}")
    else:
        print(f"cpu_speed = {speed:.3f}  (geometric mean by CPU time; one core of this machine relative to the "
              "reference)")
        print(f'to record it: cpu_speed = {speed:.3g} and cpu_speed_source = "measured: edge-ft profile '
              f'calibrate, <date>, <board>" in the board\'s profile')
    return 0


def run_handler(args) -> int:
    from edge_ft.emulation.emulate import run_confined
    from edge_ft.emulation.profiles import load_profile

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UserError("no command given: edge-ft profile run NAME [options] -- COMMAND ...")
    from edge_ft.emulation.hostspeed import HostSpeed

    profile = load_profile(args.name)
    confined = not profile.native and (args.mode in ("auto", "cgroup") or args.timing == "cpu")
    host = HostSpeed.resolve(args.host_speed) if confined else HostSpeed.reference()
    r = run_confined(command, profile, timeout=args.timeout, mode=args.mode, host=host, timing=args.timing)
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
    else:
        sys.stdout.write(r.stdout_tail)
        sys.stderr.write(r.stderr_tail)
        fit = "does not fit" if not r.fits else r.status
        print(f"{profile.name} ({r.emulation}): {fit} in {_mb(r.memory_limit_bytes)}, exit {r.exit_code}, "
              f"{r.wall_seconds:.2f} s wall, {r.cpu_seconds:.2f} s CPU, peak RSS {_mb(r.peak_rss_bytes)}"
              f"{', cgroup peak ' + _mb(r.cgroup_peak_bytes) if r.cgroup_peak_bytes else ''}", file=sys.stderr)
        if r.timing == "quota":
            print(f"speed: {profile.cpu_speed:g} of the reference core; this machine's core is {host.describe()}, so "
                  f"each thread gets {r.cpu_quota:.3g} of a CPU here (throttling efficiency {r.quota_efficiency:.2f})",
                  file=sys.stderr)
        for note in r.notes:
            print(f"note: {note}", file=sys.stderr)
    return 0 if r.status == "ok" else 1


def check_handler(args) -> int:
    from edge_ft.emulation.check import CHECK_HEADER, check_profile, check_table
    from edge_ft.emulation.hostspeed import HostSpeed
    from edge_ft.emulation.profiles import list_profiles, load_profile

    if args.profiles == "all":
        profiles = [p for p in list_profiles() if not p.native]
    else:
        profiles = [load_profile(name.strip()) for name in args.profiles.split(",") if name.strip()]
    if not profiles or any(p.native for p in profiles):
        raise UserError("profile check needs confined profiles (the native `host` profile is this machine)")
    host = HostSpeed.resolve(args.host_speed, refresh=args.refresh, quiet=args.quiet)
    if args.workload == "train":
        return train_check(args, profiles, host)
    checks = []
    for p in profiles:
        if not args.quiet:
            print(f"checking {p.name} ...", file=sys.stderr, flush=True)
        checks.append(check_profile(p, host, mode=args.mode, cycles=args.cycles, memory=not args.no_memory))
    if args.json:
        print(json.dumps({"host": host.to_record(), "checks": [c.to_dict() for c in checks]}, indent=2))
        return 0
    print(f"this machine: {host.describe()}")
    print(text_table([CHECK_HEADER] + check_table(checks)))
    return 0


def train_check(args, profiles, host) -> int:
    """`profile check --workload train`: the bundles prepared once under --out, then every board x method."""
    from pathlib import Path

    from edge_ft.bench.measure import SweepSettings
    from edge_ft.bench.sweep import SweepOptions, plan, prepare
    from edge_ft.emulation.check_train import TRAIN_HEADER, TRAIN_METHODS, check_train, train_table

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in TRAIN_METHODS]
    if unknown or not methods:
        raise UserError(f"--methods: choose from {', '.join(TRAIN_METHODS)} (got {args.methods!r})")
    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    jobs = plan(["mnist→digits"], methods, ["ort-step"], profiles, SweepSettings(host_speed=host.speed))
    prep, paths = prepare(jobs, Path(args.out), SweepOptions(base=args.base, quiet=args.quiet, host=host))
    checks = []
    for p in profiles:
        for m in methods:
            say(f"checking {p.name} {m} ...")
            checks.append(check_train(p, m, paths["bundles"][(m, "ort-step", "mnist→digits")], prep.device_python,
                                      prep.child_env(), host, Path(args.out) / "check", args.runs, args.steps,
                                      args.mode, say, args.timing))
    if args.json:
        print(json.dumps({"host": host.to_record(), "checks": [c.to_dict() for c in checks]}, indent=2))
    else:
        print(f"this machine: {host.describe()}; timing: {args.timing}")
        print(text_table([TRAIN_HEADER] + train_table(checks)))
    return 0
