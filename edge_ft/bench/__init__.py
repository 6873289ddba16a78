"""Measured runs: fine-tuning runs measured on (or as) the device, one record each in a JSONL results file.
Emulating a board (profiles, confined runs, host speed) is edge_ft.emulation's; this package uses it. What the
records are turned into lives beside it: edge_ft.advice (which method), edge_ft.reports (report.md, plots, the
table format), edge_ft.gates (what a CI job fails on).

  records    the results file (atomic appends, tolerant reads, run keys, the latest record per run) and the record
  prepare    host-side preparation of a sweep: base, data and bundles, cached (runs in a child with torch)
  measure    one fine-tuning run confined to a profile -> one record
  sweep      every method x engine x profile, resumable, quota-limited runs side by side
  tradeoff   per model, board and method: the largest batch that still fits (`edge-ft bench --models`)
  own_data   a user's data folder or .npz files as a sweep's task
  speed      step speed of the three engines on this machine, measured in one run (needs the host extra)
  demo       the whole story for `make demo`

Torch-free: everything here also runs on the device itself (prepare's child and speed need the host extra).
"""
