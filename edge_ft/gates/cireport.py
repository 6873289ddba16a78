"""What a CI job shows of gate and baseline outcomes: a terminal table, a JUnit XML file, a Markdown summary.

    print(terminal_text(outcomes))
    write_junit(Path("gates.xml"), outcomes)          # one <testsuite> per suite, one <testcase> per outcome
    write_summary(Path("summary.md"), outcomes)       # also appended to $GITHUB_STEP_SUMMARY when it is set
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from edge_ft.atomic import atomic_write_bytes, atomic_write_text
from edge_ft.gates.assertions import Outcome
from edge_ft.reports.format import md_table, text_table

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"  # the file GitHub Actions renders on the job's page
SUITE_TITLES = {"gates": ("gate", "gates"), "baseline": ("baseline comparison", "baseline comparisons")}
FAILURE_HEADER = ["check", "run", "measured", "expected / why"]


def headline(outcomes: list[Outcome]) -> str:
    """'edge-ft gates FAILED: 1 of 3 gates failed; all 2 baseline comparisons hold' or 'edge-ft gates passed: ...'."""
    parts = []
    for suite, (one, many) in SUITE_TITLES.items():
        mine = [o for o in outcomes if o.suite == suite]
        if mine:
            failed, skipped = sum(o.failed for o in mine), sum(o.status == "skip" for o in mine)
            held = (f"{failed} of {len(mine)} {many} failed" if failed else
                    f"the {one} holds" if len(mine) == 1 else f"all {len(mine)} {many} hold")
            parts.append(held + (f" ({skipped} skipped)" if skipped else ""))
    verdict = "FAILED" if any(o.failed for o in outcomes) else "passed"
    return f"edge-ft gates {verdict}: {'; '.join(parts)}"


def failure_rows(outcomes: list[Outcome]) -> list[list[str]]:
    return [[o.name, f.run, f.measured, f.why] for o in outcomes if o.failed for f in o.failures]


def terminal_text(outcomes: list[Outcome]) -> str:
    """Every outcome on one line, then a table of what failed (the lines a CI log shows)."""
    lines = [headline(outcomes)]
    width = max(len(o.name) for o in outcomes)
    lines += [f"  {o.status.upper() if o.failed else o.status:<4}  {o.name:<{width}}  {o.detail}".rstrip()
              for o in outcomes]
    rows = failure_rows(outcomes)
    if rows:
        lines += ["", "what failed:"] + ["  " + line for line in text_table([FAILURE_HEADER, *rows]).splitlines()]
    return "\n".join(lines)


def junit_xml(outcomes: list[Outcome]) -> bytes:
    """JUnit XML as CI systems read it: <testsuites> of <testsuite name="edge-ft gates"|"edge-ft baseline">,
    each outcome a <testcase> with a <failure message> or <skipped message>."""
    root = ET.Element("testsuites", name="edge-ft", tests=str(len(outcomes)),
                      failures=str(sum(o.failed for o in outcomes)), errors="0",
                      skipped=str(sum(o.status == "skip" for o in outcomes)))
    for suite in SUITE_TITLES:
        mine = [o for o in outcomes if o.suite == suite]
        if not mine:
            continue
        node = ET.SubElement(root, "testsuite", name=f"edge-ft {suite}", tests=str(len(mine)),
                             failures=str(sum(o.failed for o in mine)), errors="0",
                             skipped=str(sum(o.status == "skip" for o in mine)))
        for o in mine:
            case = ET.SubElement(node, "testcase", classname=f"edge-ft.{suite}", name=o.name)
            if o.failed:
                failure = ET.SubElement(case, "failure", message=o.message(), type=suite)
                failure.text = "\n".join(f"{f.run}: {f.measured} {f.why}" for f in o.failures)
            elif o.status == "skip":
                ET.SubElement(case, "skipped", message=o.detail)
            else:
                ET.SubElement(case, "system-out").text = o.detail
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def write_junit(path: Path, outcomes: list[Outcome]) -> None:
    atomic_write_bytes(path, junit_xml(outcomes))


def summary_markdown(outcomes: list[Outcome], notes: Sequence[str] = ()) -> str:
    rows = [[_code(o.name), "**FAIL**" if o.failed else o.status, _cell(o.detail)] for o in outcomes]
    parts = [f"## {headline(outcomes)}", "", md_table(["check", "result", "detail"], rows, text_columns=3)]
    failed = failure_rows(outcomes)
    if failed:
        rows = [[_code(check), *map(_cell, rest)] for check, *rest in failed]
        parts += ["", "### What failed", "", md_table(FAILURE_HEADER, rows, text_columns=4)]
    if notes:
        parts += [""] + [f"- note: {_cell(n)}" for n in notes]
    return "\n".join(parts) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """A check's name as code, so the `*` of a pattern is not read as emphasis."""
    return f"`{_cell(text)}`"


def write_summary(path: Path | None, outcomes: list[Outcome], notes: Sequence[str] = ()) -> Path | None:
    """Write the summary to `path` (atomically) and append it to $GITHUB_STEP_SUMMARY when that is set; returns
    the step-summary file appended to, if any."""
    text = summary_markdown(outcomes, notes)
    if path is not None:
        atomic_write_text(path, text)
    step = os.environ.get(STEP_SUMMARY_ENV)
    if not step:
        return None
    try:
        with open(step, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as e:  # the job page's summary is a courtesy: say so, but never fail a gate over it
        print(f"warning: cannot append to ${STEP_SUMMARY_ENV} ({step}): {e.strerror or e}", file=sys.stderr)
        return None
    return Path(step)
