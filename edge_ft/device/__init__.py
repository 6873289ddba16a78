"""Device half: bundles, on-device training and adapters on numpy + onnxruntime only.

Nothing under this package may import torch or onnx: a Raspberry Pi installs the wheel with its `[device]` extra alone.
"""
