"""How figures and tables are written, once for every report, summary and command that prints them.

    text_table([["method", "ms"], ["lora", "1.2"]])                 aligned text columns (terminal output)
    md_table(["method", "ms"], [["lora", "1.2"]])                   a markdown table (report.md, CI summaries)
    mb(peak_bytes) -> "91"; mb(peak_bytes, unit=True) -> "91 MB"    bytes as whole MiB, "-" when unknown
    fmt_ms(record) -> "3.41"                                        the step time a report quotes
    short_result(record) -> "fits" | "over budget (328 MB)" | "OOM" | "timeout" | "failed"

Standard library only (no numpy, no matplotlib).
"""

from __future__ import annotations

from collections.abc import Sequence

from edge_ft.bench.records import BenchRecord, step_ms
from edge_ft.contracts import MB

SHORT_STATUS = {"out_of_memory": "OOM", "timeout": "timeout", "failed": "failed"}  # a failed run's status, shortened


def mb(nbytes: float | None, unit: bool = False) -> str:
    """Bytes as whole MiB ("91", or "91 MB" with `unit`); "-" for a figure that is not known."""
    if nbytes is None:
        return "-"
    return f"{nbytes / MB:.0f} MB" if unit else f"{nbytes / MB:.0f}"


def fmt_ms(record: BenchRecord) -> str:
    """The step time to quote (edge_ft.bench.records.step_ms): under a CPU quota the board time, p50 otherwise."""
    value = step_ms(record)
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 1 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def short_result(r: BenchRecord) -> str:
    """'fits', 'over budget (328 MB)', 'OOM', 'timeout' or 'failed': the verdict in a table cell."""
    if r.get("fits"):
        return "fits"
    if r["status"] == "ok":
        return f"over budget ({mb(r['peak_rss_bytes'])} MB)"
    return SHORT_STATUS.get(r["status"], str(r["status"]))


def text_table(rows: Sequence[Sequence[object]], right_aligned: bool = False) -> str:
    """Rows (the first is the header) as text columns two spaces apart; with `right_aligned` every column but the
    first is aligned right (figures), otherwise all are aligned left."""
    cells = [[str(c) for c in row] for row in rows]
    if not cells:
        return ""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if right_aligned and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        .rstrip() for row in cells)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]], text_columns: int = 1) -> str:
    """A markdown table; the first `text_columns` columns are left-aligned, the rest (figures) right-aligned."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
