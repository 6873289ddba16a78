"""Write a tiny seeded ONNX model (Conv -> Relu -> Gemm -> Softmax) and its input for the ARM smoke test.

Host side (needs the onnx package): `python tools/arm/smoke_model.py OUT_DIR` writes OUT_DIR/{model.onnx,input.npy}.
Conv and Gemm take onnxruntime's MLAS kernels, which differ between x86 (AVX) and aarch64 (NEON).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(seed)
    w_conv = rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32)  # (C_out,C_in,k,k)
    b_conv = rng.normal(0, 0.1, (4,)).astype(np.float32)
    w_fc = rng.normal(0, 0.1, (4 * 6 * 6, 10)).astype(np.float32)  # (features, classes)
    b_fc = rng.normal(0, 0.1, (10,)).astype(np.float32)
    x = rng.random((16, 1, 8, 8), dtype=np.float32)  # (B,1,8,8) -> conv (B,4,6,6) -> (B,144) -> (B,10)
    nodes = [
        helper.make_node("Conv", ["x", "w_conv", "b_conv"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["act"]),
        helper.make_node("Flatten", ["act"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w_fc", "b_fc"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in
             [("w_conv", w_conv), ("b_conv", b_conv), ("w_fc", w_fc), ("b_fc", b_fc)]]
    graph = helper.make_graph(
        nodes, "arm_smoke",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["B", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model, x


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    model, x = build()
    onnx.save(model, out / "model.onnx")
    np.save(out / "input.npy", x)
