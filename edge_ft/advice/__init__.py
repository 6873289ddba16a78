"""Advice from benchmark records: which method and engine to run on a board, and what an unmeasured board would do.

  recommend     a method and engine for a profile from the measured records, with the figures that decide it
  model_choice  the same for one model, from the per-model records of `edge-ft bench --models`
  forecast      predicted runs for an unmeasured profile (cost-model FLOPs x measured rates), checked against
                records where both exist (`edge-ft recommend --predict`; not `edge-ft predict`, which classifies)

Reads records (edge_ft.bench.records); never measures. Torch-free.
"""
