"""The speed benchmark and the per-operator profile: they run, report every engine, and count real operators."""

import json

import onnx
import ort_step_support as support
import pytest

from edge_ft.cli import main
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.data.npz import save_npz
from edge_ft.data.readers import read_mnist_5k


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    x, y = read_mnist_5k()
    path = tmp_path_factory.mktemp("speed") / "train.npz"
    save_npz(path, x[:96], y[:96])
    return path


def test_profile_ops_summarises_the_step_graphs_operators(digits, tmp_path, capsys):
    bundle = support.bundle_path(MethodConfig("full"), OptimizerConfig("adamw", lr=1e-3))
    assert main(["train", str(bundle), "--data", str(digits), "--steps", "6", "--batch", "16", "--threads", "1",
                 "--profile-ops", "--quiet", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "op_profile.json").read_text())
    assert summary["runs"] == 6 and summary["ms_per_step"] > 0
    ops = {r["op"] for r in summary["by_op"]}
    assert {"Resize", "Gather"} <= ops and ops & {"MatMul", "FusedMatMul"}  # pool backward, dW's unfold and GEMM
    graph = [n.op_type for n in onnx.load(bundle / "train_step.onnx").graph.node]
    # Both pools forward and backward as Resize (none as AveragePool); ReLU's backward as a multiply.
    assert graph.count("Resize") == 4 and "AveragePool" not in graph and "LessOrEqual" not in graph
    # The loss and its gradient: one SoftmaxCrossEntropyLoss, not the traced log_softmax / nll_loss.
    assert graph.count("SoftmaxCrossEntropyLoss") == 1 and not {"LogSoftmax", "ScatterElements"} & set(graph)
    assert abs(sum(r["share"] for r in summary["by_op"]) - 1) < 1e-2
    assert not list((tmp_path / "run").glob("ort-profile*.json"))  # the raw trace is not left behind
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["op_profile"]["file"] == "op_profile.json"
    assert "operator time per step" in capsys.readouterr().out


def test_profile_ops_refuses_the_training_api_engine(digits, tmp_path, capsys):
    from tests.ort_training_support import METHODS, bundle

    assert main(["train", str(bundle(METHODS["probe"])), "--data", str(digits), "--steps", "1", "--profile-ops",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--profile-ops profiles the ort-step graph" in capsys.readouterr().err


@pytest.mark.slow
def test_speed_benchmark_times_every_engine_in_one_run(tmp_path, capsys):
    assert main(["speed", "--methods", "probe", "--batches", "8", "--steps", "5", "--peers", "none",
                 "--out", str(tmp_path / "speed.json")]) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    (row,) = result["rows"]
    assert set(row["ms"]) == {"torch", "ort-training", "ort-step"} and min(row["ms"].values()) > 0
    assert row["flops"] > 0 and result["sgemm_gflops"] > 0
    assert row["step_vs_torch"] == pytest.approx(row["ms"]["ort-step"] / row["ms"]["torch"], rel=1e-2)
    assert "| probe | 8 |" in capsys.readouterr().out
