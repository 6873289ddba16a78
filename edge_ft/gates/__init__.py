"""What a CI job fails on: assertions on benchmark records, a comparison with a stored baseline, their reports.

  assertions  PROFILE:METHOD[:ENGINE]:FIELD OP VALUE checked against the latest records (`--assert`, `edge-ft gate`)
  baseline    a new sweep against a stored one, on the figures that survive a change of runner
  cireport    the outcomes as a terminal table, JUnit XML and a Markdown summary

Torch-free: standard library only, on records read by edge_ft.bench.records.
"""
