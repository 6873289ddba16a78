"""User-facing errors: one clear line and exit code 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (a path, a file, an option). The CLI prints it on one line and exits 2."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, whatever a damaged file put into a quoted value: a newline in it must not split the message.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def require_host(feature: str = "this command") -> None:
    """Fail with one line when the host extra (torch, onnx, onnxruntime-training) is not installed."""
    import importlib.util

    missing = [m for m in ("torch", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"{feature} needs the host extra ({', '.join(missing)} not installed): "
            "pip install 'edge-ft[host]' on a workstation; a device install only trains exported bundles"
        )
