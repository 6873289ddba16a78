"""User-facing errors: one clear line and exit code 2, never a traceback."""

from __future__ import annotations


def install_hint(extras: str) -> str:
    """How to install edge-ft with `extras` ("device", "host", "device,images"): from the wheel `make dist` builds."""
    from edge_ft import __version__

    return f"pip install 'edge_ft-{__version__}-py3-none-any.whl[{extras}]' (the wheel from `make dist`)"


def plural(count: int, noun: str) -> str:
    """'1 step', '2 steps': a count with its noun, singular for one."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


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
            f"{install_hint('host')} on a workstation, or `make venv` in the checkout; a device install trains, "
            "adapts and predicts with exported bundles"
        )
