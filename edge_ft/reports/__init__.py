"""Reports of benchmark and fleet results, and the one place figures and tables are formatted.

  format           text_table, md_table, mb, fmt_ms, short_result: every table and figure edge-ft prints or writes
  report           report.md from a results file: tables, plots, goals and a recommendation (`edge-ft report`)
  tradeoff_report  the per-model part of report.md (records of `edge-ft bench --models`)
  plots            the PNG figures (matplotlib, Agg backend); pyplot() and save_figure() for other reports too

Torch-free; plots needs matplotlib (the host extra).
"""
