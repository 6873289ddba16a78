"""The closing lines of `make test-cgroup-v2`, from the junit XML pytest wrote inside the VM.

Stdlib only. Figures a test recorded (pytest's record_property) are printed with it.
Inside the VM every cgroup test must run: a skipped one means the v2 path was not exercised, so it
counts as a failure here (with its reason), as does pytest's own non-zero exit (e.g. 5: no tests collected).

    python3 summary.py JUNIT.xml PYTEST_EXIT_CODE      exit 0 only when all ran and passed
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def summarize(junit: Path, pytest_exit: int) -> tuple[list[str], int]:
    """(lines to print, exit status)."""
    try:
        cases = list(ET.parse(junit).getroot().iter("testcase"))
    except (OSError, ET.ParseError) as e:
        return [f"cannot read {junit}: {e}", "test-cgroup-v2: 0 passed, 1 failed"], 1
    passed, failed, lines = 0, 0, []
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        skipped = case.find("skipped")
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failed += 1
            lines.append(f"FAILED {name}: {(problem.get('message') or '').splitlines()[0][:200]}")
        elif skipped is not None:
            failed += 1
            lines.append(f"SKIPPED (counted as failed: the VM is cgroup v2) {name}: {skipped.get('message')}")
        else:
            passed += 1
        measured = [f"{p.get('name')}={p.get('value')}" for p in case.iter("property")]
        if measured:
            lines.append(f"measured {case.get('name')}: {', '.join(measured)}")
    if pytest_exit != 0 and failed == 0:
        failed = 1
        lines.append(f"pytest exited {pytest_exit}")
    lines.append(f"test-cgroup-v2: {passed} passed, {failed} failed")
    return lines, int(failed > 0)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    lines, status = summarize(Path(argv[0]), int(argv[1]))
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
