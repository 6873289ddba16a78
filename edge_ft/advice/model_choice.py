"""Which method for one model on a board, from the per-model records of `edge-ft bench --models`.

    rec = recommend_model(records, load_profile("rpi-zero-2w"), "ds-cnn", Constraints(), batch=64)
    rec.choice      # the chosen record, or None when no method fits
    rec.lines       # the figures that decide it and what rules each other method out

Those runs measure memory and time on synthetic inputs, not accuracy, so the rule is about what the board can
afford: a method is feasible when its step finished within the memory limit (the profile's budget unless
--max-rss) at the measured batch, its batch search fits the wanted batch (--batch; default: the measured one) and
its step time is within --max-step-ms. Among feasible methods the one that trains the most parameters wins (it can
adapt the most of the network); a tie goes to the faster step. Whether it also learns the task best is for a task
sweep to say (`edge-ft bench --task`).
"""

from __future__ import annotations

from edge_ft.advice.recommend import Constraints, Recommendation
from edge_ft.bench.records import BenchRecord, step_ms
from edge_ft.bench.tradeoff import fitting_text, label
from edge_ft.contracts import MB
from edge_ft.emulation.profiles import DeviceProfile
from edge_ft.reports.format import fmt_ms, mb


def model_runs(records: list[BenchRecord], profile: str, model: str) -> list[BenchRecord]:
    """The latest record per label of `model` on `profile`."""
    out: dict[str, BenchRecord] = {}
    for r in records:
        if r["profile"] == profile and r["model"] == model:
            out[label(r)] = r
    return list(out.values())


def fits_batch(r: BenchRecord, batch: int) -> bool | None:
    """Whether the search says `batch` fits (None: beyond what the search tried)."""
    lo, hi = r.get("max_fitting_batch"), r.get("first_failing_batch")
    if lo is None:
        return None
    if batch <= lo:
        return True
    return None if hi is None or batch < hi else False


def model_exclusion(r: BenchRecord, profile: DeviceProfile, c: Constraints, batch: int) -> tuple[str, str] | None:
    """(reason, this run's figure) that rules the method out, or None when it is feasible."""
    if r["status"] == "out_of_memory" or (r["status"] == "ok" and not r.get("fits")):
        return f"does not fit in {r['budget_mb']} MB at batch {r['batch']}", f"peak RSS {mb(r['peak_rss_bytes'])} MB"
    if r["status"] != "ok":
        return r.get("verdict") or r["status"], ""
    limit = c.max_rss_mb if c.max_rss_mb is not None else (None if profile.native else profile.budget_mb)
    if limit is not None and r["peak_rss_bytes"] > limit * MB:
        return f"peak RSS above {limit:g} MB", f"{mb(r['peak_rss_bytes'])} MB"
    if fits_batch(r, batch) is False:
        return f"batch {batch} does not fit", f"largest fitting batch {fitting_text(r)}"
    if fits_batch(r, batch) is None:
        return f"batch {batch} not measured", f"searched up to {r['settings']['max_batch']}"
    ms = step_ms(r)
    if c.max_step_ms is not None and (ms is None or ms > c.max_step_ms):
        return f"slower than {c.max_step_ms:g} ms/step", f"{fmt_ms(r)} ms at batch {r['batch']}"
    return None


def describe(r: BenchRecord) -> str:
    return (f"{label(r)}: {r['trainable_params']:,} of {r['total_params']:,} parameters train, "
            f"{fmt_ms(r)} ms/step and peak RSS {mb(r['peak_rss_bytes'])} of {r['budget_mb']} MB at batch "
            f"{r['batch']}, largest fitting batch {fitting_text(r)}")


def recommend_model(records: list[BenchRecord], profile: DeviceProfile, model: str, c: Constraints = Constraints(),
                    batch: int | None = None) -> Recommendation:
    runs = model_runs(records, profile.name, model)
    rec = Recommendation(profile.name, f"{model} (synthetic inputs)", None)
    if not runs:
        rec.lines = [f"{profile.name}: no per-model measurements of {model}; run `edge-ft bench --models {model} "
                     f"--profiles {profile.name}`"]
        return rec
    wanted = batch or runs[0]["batch"]
    for r in runs:
        why = model_exclusion(r, profile, c, wanted)
        if why is None:
            rec.feasible.append(r)
        else:
            rec.excluded.append((r, "model", *why))
    ranked = sorted(rec.feasible, key=lambda r: (-r["trainable_params"], step_ms(r) or float("inf")))
    rec.choice = ranked[0] if ranked else None
    head = f"{profile.name}, {model} at batch {wanted}:"
    if rec.choice is None:
        rec.lines = [f"{head} nothing fits."]
    else:
        rec.lines = [f"{head} {label(rec.choice)} on ort-step (of the methods that fit, it trains the most "
                     "parameters; of equals, the faster step).", f"  {describe(rec.choice)}"]
        rec.lines += [f"  also fits: {describe(r)}" for r in ranked[1:]]
    rec.lines += [f"  ruled out: {label(r)}: {why}" + (f" ({figure})" if figure else "")
                  for r, _, why, figure in rec.excluded]
    rec.lines.append("  accuracy is not part of these runs (synthetic inputs); compare methods on your data with "
                     "`edge-ft bench --task`.")
    return rec
