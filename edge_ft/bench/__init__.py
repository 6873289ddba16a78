"""Measuring on (or as) the device: device profiles, confined runs that emulate a profile, CPU calibration.

  profiles   device_profiles/*.toml -> DeviceProfile (validated; found by name or by path)
  cgroups    creating, filling and removing the cgroups one confined run lives in (v1, and v2 where present)
  emulate    run_confined(argv, profile): a child process under the profile's memory, core and speed limits
  calibrate  a fixed numpy workload whose timing gives this machine's speed relative to the reference core
  records    the sweep's JSONL results file (atomic appends, tolerant reads, run keys)
  prepare    host-side preparation of a sweep: base, data and bundles, cached (runs in a child with torch)
  measure    one fine-tuning run confined to a profile -> one record
  sweep      every method x engine x profile, resumable, quota-limited runs side by side
  report     report.md with tables and goal ratios; plots draws its PNGs (matplotlib)
  recommend  a method and engine for a profile from the records, with the figures that decide it
  predict    predicted runs for an unmeasured profile (cost-model FLOPs x measured rates), checked against records
  demo       the whole story for `make demo`

Torch-free: everything here also runs on the device itself (prepare's child and the plots need the host extra).
"""
