"""Where an ort-step training process's memory goes, phase by phase, in the device venv (no torch).

    .venv-device/bin/python tools/ort-step-memory.py BUNDLE [--batch 32] [--steps 60]

Prints RSS after each phase: onnxruntime and the engine imported; onnxruntime's environment (the first session of
any graph, here a one-node graph, pays it); the bundle loaded; the engine (step and forward sessions, state, bound
buffers); the first step (onnxruntime's arena for the step's intermediates); the remaining steps. Each figure is
the process's RSS and its high-water mark, in MiB, on a random batch of the bundle's input shape.
"""

import argparse
import resource

import numpy as np
import psutil

from edge_ft.contracts import MB

_PROCESS = psutil.Process()


def _mark(marks: list, what: str) -> None:
    marks.append((what, _PROCESS.memory_info().rss / MB, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def _one_node_graph() -> bytes:
    """A Relu graph, written with the device's wire helpers (the device venv has no onnx package)."""
    from edge_ft.device.engines.onnx_wire import _len_field, _varint

    def value(name: str) -> bytes:  # ValueInfoProto: name, float tensor of shape (1,)
        shape = _len_field(2, _len_field(1, _varint(1 << 3) + _varint(1)))
        return _len_field(1, name.encode()) + _len_field(2, _len_field(1, _varint(1 << 3) + _varint(1) + shape))

    node = _len_field(1, b"x") + _len_field(2, b"y") + _len_field(4, b"Relu")
    graph = _len_field(1, node) + _len_field(2, b"g") + _len_field(11, value("x")) + _len_field(12, value("y"))
    opset = _len_field(8, _varint(2 << 3) + _varint(17))
    return _varint(1 << 3) + _varint(8) + _len_field(7, graph) + opset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    marks: list = []
    from edge_ft.device.engines.ort_step import OrtStepEngine
    from edge_ft.device.ort_api import import_onnxruntime

    ort = import_onnxruntime()
    _mark(marks, "imports")
    ort.InferenceSession(_one_node_graph(), providers=["CPUExecutionProvider"])
    _mark(marks, "onnxruntime environment")
    from edge_ft.device.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    _mark(marks, "bundle")
    x = np.random.default_rng(0).random((args.batch, *bundle.input_shape), dtype=np.float32)
    y = np.arange(args.batch) % bundle.num_classes
    engine = OrtStepEngine(bundle, threads=1)
    _mark(marks, "engine")
    engine.train_step(x, y, 0.01)
    _mark(marks, "first step")
    for _ in range(args.steps - 1):
        engine.train_step(x, y, 0.01)
    _mark(marks, f"{args.steps} steps")
    print("| phase | RSS | high-water |\n|---|---:|---:|")
    for what, rss, peak in marks:
        print(f"| {what} | {rss:.1f} MB | {peak:.1f} MB |")


if __name__ == "__main__":
    main()
