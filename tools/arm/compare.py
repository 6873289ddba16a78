"""Compare the same run on x86 and on emulated aarch64 and print the `make test-arm` summary table.

Stdlib only (runs with any python3). Each case names an x86 JSON and an aarch64 JSON holding the same list of
numbers under FIELD (per-step losses of `edge-ft train`, or the smoke model's outputs); a case passes when every
pair satisfies |arm - x86| <= atol + rtol * |x86| and the aarch64 side really ran on aarch64.

    python3 compare.py --machine aarch64 --case full X86.json ARM.json --case lora ... [--field losses]
    python3 compare.py --machine aarch64 --kind outputs --field values --case smoke X86.json ARM.json
    ... --json CASES.json   also writes the results for tools/arm/summary.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

RTOL = 1e-4  # x86 (AVX/FMA) and aarch64 (NEON) kernels sum in different orders: ~1e-6 relative per step
ATOL = 1e-6  # floor for values near zero


@dataclass(frozen=True)
class CaseResult:
    name: str  # method (or "smoke")
    count: int  # number of compared values (steps)
    max_abs: float  # max |arm - x86|
    max_rel: float  # max |arm - x86| / |x86|
    passed: bool


def field_values(obj: dict, field: str) -> list[float]:
    """Follow a dotted path ('losses' or 'train.losses') to a list of numbers."""
    value = obj
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"no {field!r} in the results (keys: {sorted(obj) if isinstance(obj, dict) else obj})")
        value = value[key]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{field!r} must be a non-empty list of numbers")
    return [float(v) for v in value]


def compare(name: str, x86: list[float], arm: list[float], rtol: float = RTOL, atol: float = ATOL) -> CaseResult:
    if len(x86) != len(arm):
        return CaseResult(name, min(len(x86), len(arm)), math.inf, math.inf, False)
    diffs = [abs(a - b) for a, b in zip(arm, x86)]
    rels = [d / abs(b) if b else (0.0 if d == 0 else math.inf) for d, b in zip(diffs, x86)]
    finite = all(math.isfinite(v) for v in x86 + arm)
    passed = finite and all(d <= atol + rtol * abs(b) for d, b in zip(diffs, x86))
    return CaseResult(name, len(x86), max(diffs), max(rels), passed)


# --kind: what the compared numbers are, as the table's column headings.
KINDS = {
    "losses": ("method", "steps", "max |loss_arm - loss_x86|"),
    "outputs": ("model", "values", "max |out_arm - out_x86|"),
}


def table(results: list[CaseResult], machine: str, kind: str = "losses") -> str:
    name, count, diff = KINDS[kind]
    head = f"{name:<8} {count:>6} {diff:>26} {'max rel':>9}  {'result':<6} uname -m"
    lines = [head, "-" * len(head)]
    for r in results:
        ok = "pass" if r.passed and machine == "aarch64" else "FAIL"
        lines.append(f"{r.name:<8} {r.count:>6} {r.max_abs:>26.3e} {r.max_rel:>9.2e}  {ok:<6} {machine}")
    return "\n".join(lines)


def write_json(path: str, results: list[CaseResult], machine: str, kind: str) -> None:
    # Python's json writes inf as Infinity and reads it back: a case with no results keeps its inf differences.
    with open(path, "w") as f:
        json.dump({"machine": machine, "kind": kind, "cases": [asdict(r) for r in results]}, f, indent=1)


def read_json(path: str) -> tuple[list[CaseResult], str, str]:
    """What write_json wrote: (results, machine, kind)."""
    with open(path) as f:
        obj = json.load(f)
    return [CaseResult(**c) for c in obj["cases"]], obj["machine"], obj["kind"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", nargs=3, action="append", metavar=("NAME", "X86_JSON", "ARM_JSON"), required=True)
    p.add_argument("--machine", required=True, help="`uname -m` seen inside the emulated root filesystem")
    p.add_argument("--field", default="losses", help="dotted path of the list of numbers in each JSON")
    p.add_argument("--kind", choices=KINDS, default="losses", help="what the numbers are (column headings)")
    p.add_argument("--rtol", type=float, default=RTOL)
    p.add_argument("--atol", type=float, default=ATOL)
    p.add_argument("--json", metavar="PATH", help="also write the results here (read by tools/arm/summary.py)")
    args = p.parse_args(argv)
    results = []
    for name, x86_path, arm_path in args.case:
        try:
            with open(x86_path) as f:
                x86 = field_values(json.load(f), args.field)
            with open(arm_path) as f:
                arm = field_values(json.load(f), args.field)
        except (OSError, ValueError, KeyError) as e:
            print(f"{name}: cannot read results: {e}", file=sys.stderr)
            results.append(CaseResult(name, 0, math.inf, math.inf, False))
            continue
        results.append(compare(name, x86, arm, args.rtol, args.atol))
    print(table(results, args.machine, args.kind))
    if args.json:
        write_json(args.json, results, args.machine, args.kind)
    print(f"tolerance: |arm - x86| <= {args.atol:g} + {args.rtol:g} * |x86| for every value")
    ok = args.machine == "aarch64" and all(r.passed for r in results)
    if args.machine != "aarch64":
        print(f"FAIL: the emulated side reported uname -m {args.machine!r}, expected aarch64")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
