"""The exported step graph computes exactly what the method needs, and its FLOPs are the cost model's.

Every Conv / ConvTranspose / MatMul / Gemm node of train_step.onnx is run at a concrete batch (B = 61, a size
no weight has, so a leading 61 marks a per-example tensor) and its FLOPs counted as 2 x multiply-accumulates, the
cost model's convention. Nodes whose output has no batch axis produce parameter gradients; the per-example ones
are the forward (the forward graph's nodes) plus the activation gradients.
"""

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import ort_step_support as support
import pytest
from onnx import TensorProto, helper
from safetensors.numpy import load_file

from edge_ft.architecture import layer_io_shapes, param_shapes, trainable_names
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.costmodel import estimate, input_grad_layers
from edge_ft.data.npz import to_float
from edge_ft.data.readers import read_mnist_5k
from edge_ft.device.engines.ort_step import FLAT, optimizer_keys

BATCH = 61
COUNTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
OPT = OptimizerConfig("sgd-momentum", lr=0.05)  # the update adds no matmuls: any optimizer's graph would do
CONFIGS = [
    MethodConfig("full"),
    MethodConfig("probe"),
    MethodConfig("lora"),  # rank 2 on fc1, fc2, fc3
    MethodConfig("lora", rank=4, targets=("fc2", "fc3"), bias="lora_only"),
    MethodConfig("lora", targets=("fc1", "fc2"), modules_to_save=("fc3",), num_classes=3),  # a new head, trained whole
]


def config_id(cfg: MethodConfig) -> str:
    if cfg.method != "lora":
        return cfg.method
    return "-".join(["lora", *cfg.targets] + ["save", *cfg.modules_to_save] * bool(cfg.modules_to_save))


def node_flops(path, feeds: dict[str, np.ndarray]) -> list[tuple[str, tuple[int, ...], int]]:
    """(op, output shape, FLOPs) of every counted node, shapes observed by running the graph with `feeds`."""
    model = onnx.load(path)
    nodes = [n for n in model.graph.node if n.op_type in COUNTED]
    known = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    probes = sorted({name for n in nodes for name in (*n.input, n.output[0]) if name and name not in known})
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in probes)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    shapes = {name: feeds[name].shape for name in feeds}
    shapes.update(zip(names, (v.shape for v in session.run(names, feeds))))
    counted = []
    for n in nodes:
        a, w, y = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
        if n.op_type == "Conv":  # every output value is a (C_in x k x k) dot product
            macs = np.prod(y) * np.prod(w[1:])
        elif n.op_type == "ConvTranspose":  # every input value is scattered over (C_out x k x k) outputs
            macs = np.prod(a) * np.prod(w[1:])
        elif n.op_type == "MatMul":
            macs = np.prod(y) * a[-1]
        else:
            trans_a = next((helper.get_attribute_value(x) for x in n.attribute if x.name == "transA"), 0)
            macs = np.prod(y) * a[0 if trans_a else 1]
        counted.append((n.op_type, tuple(y), 2 * int(macs)))
    return counted


def graph_costs(cfg: MethodConfig):
    """(forward nodes, train-graph nodes) of the exported bundle, run on a real MNIST batch of BATCH."""
    folder = support.bundle_path(cfg, OPT)
    state = load_file(folder / "state.safetensors")
    x = to_float(read_mnist_5k()[0][:BATCH])
    y = np.arange(BATCH, dtype=np.int64) % cfg.num_classes
    weights = {n: state[n] for n in param_shapes(cfg)}
    forward = node_flops(folder / "forward.onnx", {"input": x, **weights})
    train = node_flops(folder / "train_step.onnx",
                       {"input": x, "labels": y, "lr": np.array(0.05, np.float32), **state})
    return forward, train


def per_example(shape) -> bool:
    return len(shape) > 0 and shape[0] == BATCH


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_graph_flops_equal_the_cost_model(cfg):
    forward, train = graph_costs(cfg)
    est = estimate(cfg, BATCH, OPT, "float32").flops
    activation = sum(f for _, shape, f in train if per_example(shape))
    weight_grads = sum(f for _, shape, f in train if not per_example(shape))
    assert sum(f for *_, f in forward) == est["forward"]
    assert activation - est["forward"] == est["backward_input"]
    assert weight_grads == est["backward_weight"]
    assert sum(f for *_, f in train) == est["total"]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.method != "full"], ids=config_id)
def test_head_graph_flops_equal_the_cached_cost_model(cfg):
    """The step on a cached prefix (the head bundle: LoRA's first target adds its adapter to a cached frozen
    product) runs what estimate(cached=True) prices, no more."""
    folder = support.bundle_path(cfg, OPT) / "head"
    manifest = json.loads((folder / "manifest.json").read_text())
    state = load_file(folder / "state.safetensors")
    flat = np.concatenate([state[n].ravel() for n in manifest["trainable"]])
    feeds = {"input": np.random.default_rng(0).random((BATCH, *manifest["input_shape"]), dtype=np.float32),
             "labels": np.arange(BATCH, dtype=np.int64) % cfg.num_classes, "lr": np.array(0.05, np.float32),
             FLAT: flat, **{k: np.zeros_like(flat) for k in optimizer_keys(OPT.name, [FLAT])},
             **{n: state[n] for n in manifest["frozen"]}}
    train = node_flops(folder / "train_step.onnx", feeds)
    assert sum(f for *_, f in train) == estimate(cfg, BATCH, OPT, "float32", cached=True).flops["total"]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_graph_computes_only_the_gradients_the_method_needs(cfg):
    forward, train = graph_costs(cfg)
    # Activation gradients: what the train graph computes per example beyond the forward pass.
    backward = Counter(s for _, s, _ in train if per_example(s)) - Counter(s for _, s, _ in forward)
    assert not Counter(s for _, s, _ in forward) - Counter(s for _, s, _ in train)  # the forward is all there
    expected = Counter()
    io = layer_io_shapes(cfg.num_classes)
    for layer in input_grad_layers(cfg):  # dx of every layer above the lowest trainable one, no lower
        expected[(BATCH, *io[layer][0])] += 1
    for layer in cfg.targets if cfg.method == "lora" else ():
        expected[(BATCH, cfg.rank)] += 1  # dz = dy B, needed for dA
        if layer in input_grad_layers(cfg):
            expected[(BATCH, *io[layer][0])] += 1  # the adapter's share of dx, dz A
    assert backward == expected

    # Parameter gradients: one per trainable weight-like tensor (biases are sums), none for a frozen one.
    shapes = param_shapes(cfg)
    wanted = [n for n in trainable_names(cfg) if not n.endswith(".bias")]
    produced = sorted(s for _, s, _ in train if not per_example(s))
    # A conv's weight gradient is one MatMul of its unfolded input windows: (C_in*k*k, C_out).
    conv_layout = {n: (s[1] * s[2] * s[3], s[0]) for n, s in shapes.items() if len(s) == 4}
    assert produced == sorted(conv_layout.get(n, shapes[n]) for n in wanted)
    if cfg.method == "probe":
        assert [op for op, *_ in train].count("Conv") == 2 and "ConvTranspose" not in [op for op, *_ in train]
        assert produced == [(10, 84)] and not backward  # nothing below fc3 runs backward
    if cfg.method == "full":
        assert (BATCH, 1, 28, 28) not in backward  # conv1's input (the images) gets no gradient
