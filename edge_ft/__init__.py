"""edge-ft: measure and run full fine-tuning, linear probing and LoRA on the device.

The package is split along the device boundary:
  edge_ft.host    torch side: model, methods, reference training, ONNX export (needs the `host` extra)
  edge_ft.device  numpy + onnxruntime side: bundles, on-device training, adapters (never imports torch)
Everything at the top level (config, cost model, contracts, errors) is torch-free and used by both, as are:
  edge_ft.data       tasks, readers and .npz files
  edge_ft.emulation  device profiles and runs confined to a board's memory, cores and speed
  edge_ft.bench      measured runs and their records
  edge_ft.advice     which method and engine, from the records
  edge_ft.reports    report.md, plots, and the one table format
  edge_ft.gates      what a CI job fails on
  edge_ft.trust      keys, signatures and policies for adapters and models
  edge_ft.fleet      federated fine-tuning on Flower
  edge_ft.commands   the `edge-ft` command line (edge_ft.cli); nothing else imports it
"""

__version__ = "0.1.0"
