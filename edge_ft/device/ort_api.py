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
import threading
import types
from typing import Any

from edge_ft.device.code_pages import release_code_pages
from edge_ft.device.engines.onnx_wire import one_node_model
from edge_ft.errors import UserError, install_hint

_ORTMODULE = "onnxruntime.training.ortmodule"
_TRAINING = "onnxruntime.training"

# onnxruntime's CPU memory arena, measured on LeNet-5 (README): on is up to 10% faster per step at batch 128 and
# equal at 32, with no measurable RSS cost at this model size; `edge-ft train --mem-arena off` turns it off.
_mem_arena = {"default": True}
# Two memory settings, on by default, measured on LeNet-5 in the device venv (docs/peers.md, "Memory";
# docs/peers/ort-step-memory-settings.jsonl). Together, peak RSS over RSS after imports at batch 32: full
# fine-tuning 1.44x -> 1.22x, LoRA 1.38x -> 1.18x, cached heads 1.28-1.30x -> 1.18x; full at batch 256 2.36x ->
# 1.87x; CPU ms/step unchanged.
#  * release_code: each session, once built, gives back the onnxruntime code pages its construction touched
#    (edge_ft.device.code_pages), and the process first pays onnxruntime's one-off setup on a one-node graph and
#    gives those back too, so the setup's pages and a bundle's session construction are never resident together
#    (full at batch 32: 1.44x -> 1.25x alone).
#  * shared_arena: one CPU arena for every InferenceSession of the process (session.use_env_allocators) whose first
#    region is ARENA_FIRST_REGION. With a session's own arena (a 1 MiB first region, doubling) the first step's
#    intermediates spread over several regions, and the block onnxruntime's memory pattern plans after that step
#    fits in none of them: +1.2 MB for full fine-tuning at batch 32, +24 MB at 256. In one large region the freed
#    intermediates coalesce and the planned block reuses their pages.
_memory = {"release_code": True, "shared_arena": True, "environment_ready": False}
# Bytes of address space; only the pages a run touches become resident, plus the arena's bookkeeping (about 1/32 of
# the region). 8 MiB: full at batch 32 1.21x, at 256 1.96x; 16 MiB: 1.22x, 1.87x; 64 MiB: 1.24x, 1.64x.
ARENA_FIRST_REGION = 16 << 20
SHARED_ARENA = "session.use_env_allocators"  # onnxruntime's session config key: use the allocator the env holds
_environment_lock = threading.Lock()
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


def set_memory_settings(release_code: bool | None = None, shared_arena: bool | None = None) -> None:
    """Process-wide, for sessions built after the call (the shared arena only before the first): whether
    construction-time code pages are given back, whether sessions draw on one shared arena (None: unchanged)."""
    for key, value in (("release_code", release_code), ("shared_arena", shared_arena)):
        if value is not None:
            _memory[key] = bool(value)


def prepare_environment() -> None:
    """Once per process, before its first session: register the shared CPU arena, pay onnxruntime's one-off setup
    (kernel registries for every operator) on a one-node graph and give its code pages back."""
    with _environment_lock:  # sessions may be built from several threads: one registration
        if _memory["environment_ready"]:
            return
        ort = import_onnxruntime()
        if _memory["shared_arena"]:  # max memory, extend strategy, max dead bytes per chunk: -1, onnxruntime's default
            memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, ARENA_FIRST_REGION, -1))
        ort.InferenceSession(one_node_model(), session_options(1), providers=["CPUExecutionProvider"])
        if _memory["release_code"]:
            release_code_pages()
        _memory["environment_ready"] = True


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
    `model`, that file's graph as edited in memory (`path` then names it in errors). With the arena on it draws on
    the process's shared arena; afterwards onnxruntime's construction-time code pages are given back."""
    ort = import_onnxruntime()
    prepare_environment()
    options = session_options(threads, mem_arena, profile_prefix)
    if options.enable_cpu_mem_arena and _memory["shared_arena"]:
        options.add_session_config_entry(SHARED_ARENA, "1")
    try:
        session = ort.InferenceSession(str(path) if model is None else model, options,
                                       providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        if "INVALID_PROTOBUF" in str(e):  # not an ONNX file at all, or cut short in a copy
            raise UserError(f"{path}: corrupt or truncated (onnxruntime cannot parse it as an ONNX model); copy it "
                            "again, or write it again with `edge-ft train` or `edge-ft adapter merge`") from None
        raise UserError(f"{path}: onnxruntime cannot load this model ({str(e).splitlines()[0]})") from None
    if _memory["release_code"]:
        release_code_pages()
    return session
