"""edge-ft: measure and run full fine-tuning, linear probing and LoRA on the device.

The package is split along the device boundary:
  edge_ft.host    torch side: model, methods, reference training, ONNX export (needs the `host` extra)
  edge_ft.device  numpy + onnxruntime side: bundles, on-device training, adapters (never imports torch)
Everything at the top level (config, cost model, data readers, errors) is torch-free and used by both.
"""

__version__ = "0.1.0"
