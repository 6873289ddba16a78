"""Host half: PyTorch model and methods, the reference training engine, and ONNX export.

Importing this package needs the `host` extra; device code must never import it.
"""

from edge_ft.errors import require_host

require_host("the host side of edge-ft")
