"""onnxruntime for the device side, imported so that torch and onnx never load.

Two traps in the onnxruntime-training wheel (upstream issue microsoft/onnxruntime#22070):
  * `import onnxruntime` probes `onnxruntime.training.ortmodule`, whose first line is `import torch`;
  * `onnxruntime.training.api` sits in a package whose __init__ imports `artifacts` (onnx) and `ortmodule`.
The api modules themselves need only numpy and onnxruntime.capi. So we block the ortmodule probe while
onnxruntime loads (a None entry in sys.modules is Python's documented "do not import this"), and give
`onnxruntime.training` an empty package module with the real __path__, so `onnxruntime.training.api` imports
without running the package __init__. On a standard onnxruntime (a Raspberry Pi) neither trap exists.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Any

from edge_ft.errors import UserError, install_hint

_ORTMODULE = "onnxruntime.training.ortmodule"
_TRAINING = "onnxruntime.training"

# onnxruntime's CPU memory arena, measured on LeNet-5 (README): on is up to 10% faster per step at batch 128 and
# equal at 32, with no measurable RSS cost at this model size; `edge-ft train --mem-arena off` turns it off.
_mem_arena = {"default": True}
LOG_ERRORS_ONLY = 3  # onnxruntime severity: 0 verbose ... 3 error, 4 fatal
# Whether onnxruntime's idle pool threads spin (its default) or sleep. Spinning buys a little latency when every
# thread has a core of its own; under a CPU quota shared by the job (an emulated board) every spin is charged to the
# job and steals its worker's time. The confinement sets 0 for the child (edge_ft.emulation.emulate); unset leaves
# onnxruntime's default. Read whenever a SessionOptions is built, so it covers every session of both engines.
SPINNING_ENV = "EDGE_FT_ORT_SPINNING"
_SPIN_ENTRIES = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
_SPIN_VALUES = {"0": "0", "off": "0", "no": "0", "false": "0", "1": "1", "on": "1", "yes": "1", "true": "1"}


def import_onnxruntime() -> Any:
    """`import onnxruntime` without the training wheel's torch probe; every device module imports it this way."""
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    blocked = _ORTMODULE not in sys.modules
    if blocked:
        sys.modules[_ORTMODULE] = None  # type: ignore[assignment]  # the probe catches the ImportError and carries on without ORTModule
    try:
        import onnxruntime
    except ImportError as e:
        raise UserError(f"onnxruntime is not installed ({e}): {install_hint('device')}") from None
    finally:
        if blocked and sys.modules.get(_ORTMODULE, 0) is None:
            del sys.modules[_ORTMODULE]
    onnxruntime.set_default_logger_severity(LOG_ERRORS_ONLY)
    return onnxruntime


def load_training_api() -> Any:
    """The `onnxruntime.training.api` module (CheckpointState, Module, Optimizer), torch-free."""
    ort = import_onnxruntime()
    if _TRAINING not in sys.modules:
        found = importlib.util.find_spec("onnxruntime")
        folders = list(found.submodule_search_locations or []) if found else []
        spec = importlib.util.find_spec("onnxruntime.training.api") if _has_training(folders) else None
        if spec is None:
            raise UserError(
                f"onnxruntime {ort.__version__} here has no training API: the ort-training engine needs the "
                "onnxruntime-training wheel (x86_64 Linux/Windows); export the bundle with --engine ort-step instead"
            )
    return importlib.import_module("onnxruntime.training.api")


def _has_training(folders: list[str]) -> bool:
    """Register a bare `onnxruntime.training` package (real __path__, no __init__ run) if the wheel ships one."""
    paths = [os.path.join(f, "training") for f in folders if os.path.isdir(os.path.join(f, "training", "api"))]
    if not paths:
        return False
    spec = importlib.machinery.ModuleSpec(_TRAINING, loader=None, is_package=True)
    spec.submodule_search_locations = paths
    package = types.ModuleType(_TRAINING, "onnxruntime.training, loaded without its torch-importing __init__")
    package.__spec__, package.__path__, package.__package__ = spec, paths, _TRAINING
    sys.modules[_TRAINING] = package
    sys.modules["onnxruntime"].training = package  # type: ignore[attr-defined]
    return True


def set_mem_arena(enabled: bool) -> None:
    """Process-wide choice of onnxruntime's CPU memory arena for every session made after this call."""
    _mem_arena["default"] = bool(enabled)


def spinning_setting() -> str | None:
    """onnxruntime's allow_spinning value from $EDGE_FT_ORT_SPINNING: "0", "1", or None (unset: its default)."""
    text = os.environ.get(SPINNING_ENV, "").strip().lower()
    if not text:
        return None
    if text not in _SPIN_VALUES:
        raise UserError(f"{SPINNING_ENV}={text!r}: use 0 (idle pool threads sleep) or 1 (they spin)")
    return _SPIN_VALUES[text]


def session_options(threads: int = 0, mem_arena: bool | None = None, profile_prefix: str | None = None) -> Any:
    """The SessionOptions every device session uses: intra-op threads (0 = onnxruntime's choice), arena, quiet,
    idle pool threads spinning or sleeping ($EDGE_FT_ORT_SPINNING); with `profile_prefix`, onnxruntime's per-node
    profiler writes PREFIX_<time>.json (edge_ft.device.op_profile)."""
    ort = import_onnxruntime()
    if threads < 0:
        raise UserError(f"--threads must be 0 (automatic) or a positive count, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # LeNet-5's graphs are chains: no parallel branches to run
    options.enable_cpu_mem_arena = _mem_arena["default"] if mem_arena is None else mem_arena
    options.log_severity_level = LOG_ERRORS_ONLY
    spin = spinning_setting()
    if spin is not None:
        for entry in _SPIN_ENTRIES:
            options.add_session_config_entry(entry, spin)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def inference_session(path: str | os.PathLike[str], threads: int = 0, mem_arena: bool | None = None,
                      profile_prefix: str | None = None, model: bytes | None = None) -> Any:
    """A CPU InferenceSession for a graph (a step graph, features, an inference model): the file at `path`, or
    `model`, that file's graph as edited in memory (`path` then names it in errors)."""
    ort = import_onnxruntime()
    options = session_options(threads, mem_arena, profile_prefix)
    try:
        return ort.InferenceSession(str(path) if model is None else model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        if "INVALID_PROTOBUF" in str(e):  # not an ONNX file at all, or cut short in a copy
            raise UserError(f"{path}: corrupt or truncated (onnxruntime cannot parse it as an ONNX model); copy it "
                            "again, or write it again with `edge-ft train` or `edge-ft adapter merge`") from None
        raise UserError(f"{path}: onnxruntime cannot load this model ({str(e).splitlines()[0]})") from None
