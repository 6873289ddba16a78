"""Which method and engine on this device: a choice made from measured records, with the figures that decide it.

    rec = recommend(records, load_profile("rpi-zero-2w"), "mnist→digits", Constraints(max_step_ms=200))
    rec.choice      # the chosen record, or None when nothing is feasible
    rec.lines       # a few lines that cite accuracy, step time, peak RSS and payload, and what ruled out the rest

Rule: a run is feasible when its engine installs on the profile's architecture, it finished, its peak RSS is within
the memory limit (the profile's budget unless --max-rss), its step time within --max-step-ms and its accuracy at
least --min-accuracy. Among feasible runs, those within `tolerance` of the best feasible accuracy compete on step
time, then peak RSS, then shipped bytes: on a small board a method that is as good but cheaper wins.
`choose` applies the rule to any run dicts, so predicted runs (edge_ft.advice.forecast, "basis": "predicted") go
through the same rule; a predicted run's accuracy may be unknown, and then only --min-accuracy rules it out.

Runs compared for one profile should differ only in method and engine: `mixed_runs` names any other difference
(length, batch, threads, host speed, versions, ...) so the answer can warn instead of silently mixing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_ft.bench.prepare import installable
from edge_ft.bench.records import BenchRecord, latest_runs, step_ms
from edge_ft.contracts import MB
from edge_ft.emulation.profiles import DeviceProfile
from edge_ft.reports.format import fmt_ms, mb

ARCH_WHY = {"ort-training": "the onnxruntime-training wheel exists only for x86_64",
            "torch": "no PyTorch wheel for this architecture",
            "ort-step": "no onnxruntime wheel for this architecture"}


@dataclass(frozen=True)
class Constraints:
    max_rss_mb: float | None = None  # peak RSS limit (None: the profile's budget; no limit on a native profile)
    max_step_ms: float | None = None  # step-time limit (mean under a CPU quota, p50 natively)
    min_accuracy: float | None = None  # held-out accuracy floor
    tolerance: float = 0.02  # accuracy a cheaper run may give up against the most accurate feasible one


@dataclass
class Recommendation:
    profile: str
    task: str
    choice: BenchRecord | None  # the chosen record
    feasible: list[BenchRecord] = field(default_factory=list)
    excluded: list[tuple[BenchRecord, str, str, str]] = field(default_factory=list)  # (record, kind, reason, figure)
    lines: list[str] = field(default_factory=list)
    best: BenchRecord | None = None  # the most accurate feasible run
    near: list[BenchRecord] = field(default_factory=list)  # feasible runs within the tolerance of `best`
    basis: str = "measured"  # measured | predicted (edge_ft.advice.forecast)
    mixed: list[dict[str, Any]] = field(default_factory=list)  # how the compared runs differ beyond method and engine
    extra: dict = field(default_factory=dict)  # predictions, the command that measures them, the check

    def to_dict(self) -> dict:
        pick = self.choice
        return {"profile": self.profile, "task": self.task, "basis": self.basis,
                "choice": None if pick is None else {k: pick.get(k) for k in ("label", "engine", "key")},
                "feasible": [f"{r['label']}/{r['engine']}" for r in self.feasible],
                "excluded": [{"run": f"{r['label']}/{r['engine']}", "kind": kind, "reason": why, "figure": fig}
                             for r, kind, why, fig in self.excluded],
                "mixed_runs": self.mixed, "explanation": self.lines, **self.extra}


def exclusion(r: BenchRecord, profile: DeviceProfile, c: Constraints) -> tuple[str, str, str] | None:
    """(kind, reason, this run's figure) that rules the run out, or None when it is feasible."""
    if not installable(r["engine"], profile.arch):
        return "arch", f"not installable on {profile.arch} ({ARCH_WHY[r['engine']]})", ""
    if r["status"] == "out_of_memory":
        return "memory", f"does not fit in {r['budget_mb']} MB", "killed at the cap"
    if r["status"] == "ok" and r.get("fits") is False:
        return "memory", f"does not fit in {r['budget_mb']} MB", f"peak RSS {mb(r['peak_rss_bytes'])} MB"
    predicted = r.get("basis") == "predicted"
    if r["status"] != "ok" or (r.get("accuracy") is None and not predicted):
        return r["status"], r.get("verdict") or r["status"], ""
    limit = c.max_rss_mb if c.max_rss_mb is not None else (None if profile.native else profile.budget_mb)
    if limit is not None and r["peak_rss_bytes"] > limit * MB:
        return "rss", f"peak RSS above {limit:g} MB", f"{mb(r['peak_rss_bytes'])} MB"
    ms = step_ms(r)
    if c.max_step_ms is not None and (ms is None or ms > c.max_step_ms):
        return "step", f"slower than {c.max_step_ms:g} ms/step", f"{fmt_ms(r)} ms"
    if c.min_accuracy is not None and r["accuracy"] is None:
        return "accuracy", f"accuracy unknown (never measured), so not known to reach {c.min_accuracy:g}", ""
    if c.min_accuracy is not None and r["accuracy"] < c.min_accuracy:
        return "accuracy", f"accuracy below {c.min_accuracy:g}", f"{r['accuracy']:.3f}"
    return None


def name(r: BenchRecord) -> str:
    return f"{r.get('label', r['method'])} on {r['engine']}"


def choose(runs: list[BenchRecord], profile: DeviceProfile, task: str | None, c: Constraints) -> Recommendation:
    """Apply the rule to `runs` (measured or predicted): feasible / excluded, best, near and the choice."""
    rec = Recommendation(profile.name, task or "any", None)
    for r in runs:
        why = exclusion(r, profile, c)
        if why is None:
            rec.feasible.append(r)
        else:
            rec.excluded.append((r, *why))
    known = [r for r in rec.feasible if r["accuracy"] is not None]
    if known:
        rec.best = max(known, key=lambda r: r["accuracy"])
        rec.near = [r for r in known if r["accuracy"] >= rec.best["accuracy"] - c.tolerance]
    else:  # only predicted runs of a method never measured anywhere: accuracy cannot decide, so cost does
        rec.near = list(rec.feasible)
    if rec.near:
        rec.choice = min(rec.near, key=lambda r: (step_ms(r) or float("inf"), r["peak_rss_bytes"],
                                                  r.get("payload_bytes") or 0))
    return rec


def recommend(records: list[BenchRecord], profile: DeviceProfile, task: str | None, c: Constraints = Constraints()
              ) -> Recommendation:
    runs = latest_runs(records, profile.name, task)
    rec = choose(runs, profile, task, c)
    if not runs:
        rec.lines = [f"{profile.name}: no measurements for {task or 'any task'}; run `edge-ft bench --profiles "
                     f"{profile.name}`"]
        return rec
    rec.mixed = mixed_runs(runs)
    if rec.choice is not None:
        rec.lines = explain_choice(rec.choice, rec.best, rec.near, profile, c)
        faster = faster_but_less_accurate(rec)
        if faster:
            f, best = faster, rec.best
            rec.lines.append(f"  faster but {best['accuracy'] - f['accuracy']:.3f} below the best accuracy (more than "
                             f"the {c.tolerance:g} tolerance): {name(f)}, {f['accuracy']:.3f}, {fmt_ms(f)} ms/step")
    else:
        rec.lines = [f"{profile.name}: no method/engine meets the constraints ({describe(c, profile)})."]
    rec.lines += explain_exclusions(rec.excluded)
    if rec.mixed:
        rec.lines.append(mixed_warning(rec.mixed))
    return rec


def faster_but_less_accurate(rec: Recommendation) -> BenchRecord | None:
    """The fastest feasible run outside the tolerance that beats the choice's step time, if any."""
    chosen = step_ms(rec.choice) or 0
    faster = [r for r in rec.feasible if r not in rec.near and r["accuracy"] is not None
              and (step_ms(r) or 0) < chosen]
    return min(faster, key=lambda r: step_ms(r) or 0) if faster else None


def _setting(r: BenchRecord, key: str):
    return (r.get("settings") or {}).get(key)


# What two compared runs may differ in besides method and engine: (JSON name, words, value of a record or None).
COMPARED = (
    ("length", "run length", lambda r: f"epochs {_setting(r, 'epochs') or 'recipe'}"
     + (f", steps {_setting(r, 'steps')}" if _setting(r, "steps") else "")),
    ("batch", "batch", lambda r: _setting(r, "batch") or "recipe"),
    ("seed", "seed", lambda r: _setting(r, "seed")),
    ("lora", "LoRA rank/alpha", lambda r: f"r={_setting(r, 'rank')}, alpha={_setting(r, 'alpha'):g}"
     if r["method"] == "lora" and _setting(r, "rank") else None),
    # a run timed by CPU time ran one thread standing for the board's (edge_ft.emulation.emulate): not a difference
    ("threads", "threads", lambda r: None if r.get("timing") == "cpu" else r.get("threads")),
    ("emulation", "emulation mode", lambda r: r.get("emulation")),
    ("host_speed", "host speed", lambda r: None if r.get("native") else host_speed_of(r)),
    ("base", "base weights", lambda r: (r.get("base_sha256") or "")[:12] or None),
    ("edge_ft", "edge-ft version", lambda r: (r.get("versions") or {}).get("edge_ft")),
    ("schema", "record schema", lambda r: r.get("schema")),
)


def host_speed_of(r: BenchRecord) -> str | None:
    """'0.597 (this machine)' or '0.5 (given)': the speed a run's quota was scaled by, and where it came from."""
    speed = r.get("host_speed", _setting(r, "host_speed"))
    if speed is None:
        return None
    source = r.get("host_speed_source")
    origin = {"measured": "this machine", "cached": "this machine", "given": "given", "reference": "no scaling"}
    return f"{speed:g} ({origin.get(source, 'not recorded')})"


def mixed_runs(runs: list[BenchRecord]) -> list[dict[str, Any]]:
    """[{"field", "what", "values": {value: ["label/engine", ...]}}] for every field the runs disagree on."""
    out = []
    for key, words, get in COMPARED:
        values: dict[str, list[str]] = {}
        for r in runs:
            value = get(r)
            if value is not None:
                values.setdefault(str(value), []).append(f"{r.get('label', r['method'])}/{r['engine']}")
        if len(values) > 1:
            out.append({"field": key, "what": words, "values": values})
    return out


def mixed_warning(mixed: list[dict[str, Any]]) -> str:
    """One line: 'warning: the compared runs differ in batch (recipe: 7 runs; 64: lora/ort-step); ...' (a group of
    more than three runs is counted, not listed; --json lists them all)."""
    parts = []
    for m in mixed:
        groups = "; ".join(f"{value}: {', '.join(runs) if len(runs) <= 3 else f'{len(runs)} runs'}"
                           for value, runs in m["values"].items())
        parts.append(f"{m['what']} ({groups})")
    return ("  warning: the compared runs differ in " + "; ".join(parts)
            + " - re-measure them alike (edge-ft bench --force with one set of options) before trusting the ranking")


def describe(c: Constraints, profile: DeviceProfile) -> str:
    parts = [f"peak RSS <= {c.max_rss_mb:g} MB" if c.max_rss_mb is not None
             else ("" if profile.native else f"peak RSS <= budget {profile.budget_mb} MB")]
    if c.max_step_ms is not None:
        parts.append(f"step <= {c.max_step_ms:g} ms")
    if c.min_accuracy is not None:
        parts.append(f"accuracy >= {c.min_accuracy:g}")
    return ", ".join(p for p in parts if p) or "no limits"


def explain_choice(r: BenchRecord, best: BenchRecord, near: list[BenchRecord], profile: DeviceProfile,
                   c: Constraints) -> list[str]:
    timing = ("the board time its CPU time stands for" if r.get("time_scaled") and r.get("board_ms_per_step")
              else "mean under the CPU quota" if r.get("time_scaled") else "p50")
    budget = "" if profile.native else f" of the {profile.budget_mb} MB budget"
    lines = [f"{profile.name}: {name(r)}.",
             f"  accuracy {r['accuracy']:.3f} after {r['steps']} steps"
             + ("" if best is r else f" (most accurate feasible: {name(best)}, {best['accuracy']:.3f}; within the "
                                     f"{c.tolerance:g} tolerance the faster run wins)"),
             f"  {fmt_ms(r)} ms/step ({timing}), peak RSS {mb(r['peak_rss_bytes'])} MB{budget}, "
             f"ships {r['payload_bytes']:,} bytes" + (f" (bundle {r['bundle_bytes']:,} bytes)"
                                                     if r.get("bundle_bytes") else "")]
    others = sorted((o for o in near if o is not r), key=lambda o: step_ms(o) or float("inf"))
    if others:
        o = others[0]
        ratio = (step_ms(o) or 0) / (step_ms(r) or 1)
        lines.append(f"  runner-up: {name(o)}, accuracy {o['accuracy']:.3f}, {fmt_ms(o)} ms/step "
                     f"({ratio:.1f}x the time), peak RSS {mb(o['peak_rss_bytes'])} MB")
    return lines


def explain_exclusions(excluded: list[tuple[dict, str, str, str]]) -> list[str]:
    """One line per engine and reason: 'ruled out: torch (full, probe, lora): does not fit in 320 MB (full: ...)'."""
    groups: dict[tuple[str, str], list[tuple[dict, str]]] = {}
    for r, _, reason, figure in excluded:
        groups.setdefault((r["engine"], reason), []).append((r, figure))
    lines = []
    for (engine, reason), items in groups.items():
        labels = ", ".join(r.get("label", r["method"]) for r, _ in items)
        figures = ", ".join(f"{r.get('label', r['method'])} {fig}" for r, fig in items if fig)
        lines.append(f"  ruled out: {engine} ({labels}): {reason}" + (f" ({figures})" if figures else ""))
    return lines
