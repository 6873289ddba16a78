"""The benchmark experiment: fine-tuning runs measured on (or as) the device, reported, gated, recommended.
Emulating a board (profiles, confined runs, host speed) is edge_ft.emulation's; this package uses it.

  records    the sweep's JSONL results file (atomic appends, tolerant reads, run keys)
  prepare    host-side preparation of a sweep: base, data and bundles, cached (runs in a child with torch)
  measure    one fine-tuning run confined to a profile -> one record
  sweep      every method x engine x profile, resumable, quota-limited runs side by side
  report     report.md with tables and goal ratios; plots draws its PNGs (matplotlib)
  recommend  a method and engine for a profile from the records, with the figures that decide it
  predict    predicted runs for an unmeasured profile (cost-model FLOPs x measured rates), checked against records
  demo       the whole story for `make demo`
  speed      step speed of the three engines on this machine, measured in one run (needs the host extra)
  gates      assertions on records a CI job can fail on; baseline compares a sweep with a stored one;
             cireport renders both for a CI job

Torch-free: everything here also runs on the device itself (prepare's child, speed and the plots need the host extra).
"""
