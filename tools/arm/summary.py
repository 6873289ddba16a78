"""Print the `make test-arm` report: each suite's versions and tables, one summary row per suite, a closing count.

Stdlib only. Reads what tools/arm/suite.sh left in WORK/SUITE/ (facts, smoke.json, smoke-cases.json,
train-cases.json) and the x86 reference WORK/x86/smoke.json. A suite passes when its process exited 0, it ran on
aarch64 and every expected case (smoke + each method) is present and within tolerance; a case never produced counts
as failed. Exit status 0 only when every suite passed.

    python3 summary.py --work WORK --methods full probe lora [--qemu-cpu cortex-a53 --seed 0 --wheel NAME] SUITE...
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import compare  # tools/arm/compare.py, beside this file


@dataclass
class Suite:
    name: str  # Debian suite, e.g. "trixie"
    facts: dict[str, str]  # key=value lines written by suite.sh and test-arm.sh
    versions: dict  # smoke.json of the aarch64 side ({} when the smoke run never finished)
    cases: dict[str, compare.CaseResult]  # case name -> result, for the cases that were compared
    machine: str  # uname -m inside the rootfs ("" when never reached)
    tables: list[str] = field(default_factory=list)  # rendered compare tables (smoke, methods)

    def case_ok(self, name: str) -> bool:
        r = self.cases.get(name)
        return r is not None and r.passed and self.machine == "aarch64"

    def passed(self, expected: list[str]) -> bool:
        return self.facts.get("exit") == "0" and all(self.case_ok(n) for n in expected)


def read_facts(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def load_suite(work: Path, name: str) -> Suite:
    folder = work / name
    versions = json.loads((folder / "smoke.json").read_text()) if (folder / "smoke.json").is_file() else {}
    suite = Suite(name, read_facts(folder / "facts"), versions, {}, "")
    for part in ("smoke-cases.json", "train-cases.json"):
        if (folder / part).is_file():
            results, machine, kind = compare.read_json(str(folder / part))
            suite.machine = machine
            suite.cases.update((r.name, r) for r in results)
            suite.tables.append(compare.table(results, machine, kind))
    return suite


def version_line(side: str, r: dict) -> str:
    line = (f"{side:>8}: machine {r['machine']}, python {r['python']}, numpy {r['numpy']}, "
            f"onnxruntime {r['onnxruntime']} ({', '.join(r['providers'])})")
    return line + f"\n{'':>10}edge-ft {r['edge_ft']} imported from {r['edge_ft_dir']}"


def seconds(ms: str | None) -> str:
    return f"{int(ms) / 1000:.1f} s" if ms else "-"


def report(work: Path, names: list[str], methods: list[str], qemu_cpu: str, seed: str, wheel: str) -> tuple[str, int]:
    """The printed report and the exit status."""
    expected = ["smoke", *methods]
    suites = [load_suite(work, n) for n in names]
    out = [f"make test-arm: device fine-tuning on emulated aarch64 ({qemu_cpu}) vs x86, seed {seed}, "
           f"{wheel} installed with pip --no-deps on both sides"]
    x86 = work / "x86" / "smoke.json"
    if x86.is_file():
        out.append(version_line("x86", json.loads(x86.read_text())))
    out.append(f"tolerance: |arm - x86| <= {compare.ATOL:g} + {compare.RTOL:g} * |x86| for every value")
    for s in suites:
        f = s.facts
        out += ["", f"== {s.name}: {f.get('os', 'no rootfs')}; rootfs {f.get('rootfs', 'not built')}, "
                    f"restored in {seconds(f.get('restore_ms'))}, run {f.get('run_s', '-')} s"]
        if s.versions:
            out.append(version_line("aarch64", s.versions))
        out += "\n\n".join(s.tables).splitlines()
        if f.get("exit") != "0":
            out.append(f"{s.name}: tools/arm/suite.sh exited {f.get('exit', '?')}: see its log lines above")
    head = (f"{'suite':<9} {'os':<10} {'python':<7} {'numpy':<6} {'onnxruntime':<11} {'rootfs':<15} {'run':>5}  "
            + " ".join(f"{n:<5}" for n in expected) + "  result")
    out += ["", head, "-" * len(head)]
    passed = failed = 0
    for s in suites:
        v = s.versions
        os_name = s.facts.get("os", "-").replace("GNU/Linux ", "").split(" (")[0]  # "Debian 13"
        cells = ["pass" if s.case_ok(n) else "FAIL" for n in expected]
        passed += cells.count("pass")
        failed += cells.count("FAIL") or (0 if s.passed(expected) else 1)  # a crash after the cases still fails
        run = f"{s.facts['run_s']} s" if "run_s" in s.facts else "-"
        out.append(f"{s.name:<9} {os_name:<10} {v.get('python', '-'):<7} {v.get('numpy', '-'):<6} "
                   f"{v.get('onnxruntime', '-'):<11} {s.facts.get('rootfs', '-'):<15} {run:>5}  "
                   + " ".join(f"{c:<5}" for c in cells) + f"  {'pass' if s.passed(expected) else 'FAIL'}")
    out.append(f"test-arm: {passed} passed, {failed} failed")
    return "\n".join(out), 0 if failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path, help="the harness's work folder")
    p.add_argument("--methods", nargs="+", required=True, help="the methods every suite trains")
    p.add_argument("--qemu-cpu", default="cortex-a53")
    p.add_argument("--seed", default="0")
    p.add_argument("--wheel", default="the edge-ft wheel")
    p.add_argument("suites", nargs="+")
    args = p.parse_args(argv)
    text, status = report(args.work, args.suites, args.methods, args.qemu_cpu, args.seed, args.wheel)
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
