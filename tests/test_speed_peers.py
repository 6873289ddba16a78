"""`edge-ft speed` and its on-device training peers: the comparison table from a recorded run, --peers refused in
one line when it cannot run, and ExecuTorch training the same LeNet-5 step where its venv exists (make peers-venv).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lockstep import UNIT_ROUNDOFF

from edge_ft.bench import peers
from edge_ft.bench.speed import comparison_markdown
from edge_ft.cli import main
from edge_ft.config import MethodConfig
from edge_ft.data.readers import read_mnist_5k
from edge_ft.host.methods import build_model
from edge_ft.host.model import LeNet5

RECORDED = Path(__file__).parent / "fixtures" / "speed-peers.json"  # `edge-ft speed --peers executorch --out`
PAGE = Path(__file__).parents[1] / "docs" / "peers.md"  # shows the recorded run's table


def test_comparison_table_of_a_recorded_run():
    result = json.loads(RECORDED.read_text())
    table = comparison_markdown(result).splitlines()
    assert result["machine"] in table[0] and result["date"] in table[0]
    assert f"executorch {result['rows'][0]['peers']['executorch']['executorch']}" in table[0]
    body = [line.split(" | ") for line in table[4:]]
    assert len(body) == sum(len(r["ms"]) for r in result["rows"])
    for r in result["rows"]:
        cells = {c[2]: c for c in body if c[0] == f"| {r['method']}" and c[1] == str(r["batch"])}
        assert set(cells) == set(r["ms"]) and "executorch" in cells
        ort_step = r["cpu_ms"]["ort-step"]
        for engine, c in cells.items():
            assert float(c[4]) == pytest.approx(r["cpu_ms"][engine], abs=0.005)
            assert c[6] == f"{r['cpu_ms'][engine] / ort_step:.2f}x"
        peer = r["peers"]["executorch"]
        assert cells["executorch"][3] == "sgd"
        assert cells["executorch"][7] == f"{peer['peak_rss'] / 2**20:.0f} MB"
        assert cells["ort-step"][7] == "–"  # the engines share the host process: no memory of their own


def test_docs_page_shows_the_recorded_table():
    assert comparison_markdown(json.loads(RECORDED.read_text())) in PAGE.read_text()


def test_peers_refused_in_one_line(monkeypatch, capsys, tmp_path):
    assert main(["speed", "--peers", "tflite"]) == 2
    assert "unknown peer 'tflite'" in capsys.readouterr().err
    monkeypatch.setattr(peers, "PEERS_PYTHON", tmp_path / "missing" / "python")
    assert main(["speed", "--peers", "executorch"]) == 2
    assert "make peers-venv" in capsys.readouterr().err


def test_without_peers_option_speed_runs_the_peers_it_finds(monkeypatch, capsys, tmp_path):
    from edge_ft.commands.speed import _peers

    monkeypatch.setattr(peers, "PEERS_PYTHON", tmp_path / "missing" / "python")
    assert _peers(None) == () and "make peers-venv" in capsys.readouterr().out
    assert _peers("none") == ()
    monkeypatch.setattr(peers, "PEERS_PYTHON", Path(__file__))  # any file that exists stands for the venv
    assert _peers(None) == ("executorch",) and capsys.readouterr().out == ""


def _logit_rounding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per logit, how far two correct float32 forwards may differ: γ·Σ|t| (tests/lockstep.py), Σ|t| from the
    network on absolute values (ReLU and pooling pass magnitudes through), γ summed over the layers of both."""
    absolute = copy.deepcopy(model).double()
    fan_ins = []
    with torch.no_grad():
        for m in absolute.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.abs_(), m.bias.abs_()
                fan_ins.append(m.weight[0].numel())
        terms = absolute(x.double().abs())
    return 2 * sum(math.ceil(math.log2(n)) for n in fan_ins) * UNIT_ROUNDOFF * terms


@pytest.mark.skipif(not peers.peers_available(), reason=f"no ExecuTorch venv here: {peers.INSTALL_HINT}")
def test_executorch_trains_the_same_lenet5_step(tmp_path):
    """ExecuTorch's first loss is torch's loss of the same model on the same batch, within float32 rounding; only
    fc3 trains for probe; the process reports its times and memory."""
    torch.manual_seed(0)
    base = LeNet5().state_dict()
    images, labels = read_mnist_5k()
    x, y = images[:8, None].astype(np.float32) / 255.0, labels[:8].astype(np.int64)
    model = build_model(MethodConfig("probe"), base, seed=0)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = F.cross_entropy(logits.double(), torch.from_numpy(y)).item()
    # |Δ cross-entropy| <= 2 max_j |Δ logit_j| per example (its gradient in the logits has l1 norm <= 2), plus the
    # loss's own log-sum-exp over 10 logits in float32.
    bound = 2 * _logit_rounding(model, torch.from_numpy(x)).amax(1).mean().item() \
        + 2 * math.ceil(math.log2(10)) * UNIT_ROUNDOFF * (abs(loss) + logits.abs().max().item())
    peer = peers.open_peer("executorch", model, 0.05, x, y, tmp_path)
    try:
        assert sorted(peer.info["trains"]) == ["model.fc3.bias", "model.fc3.weight"]
        cpu, wall = peer.run(3)
    finally:
        memory = peer.close()
    assert len(cpu) == len(wall) == 3 and min(wall) > 0
    assert abs(peer.losses[0] - loss) <= bound, (peer.losses[0], loss, bound)
    assert peer.losses[2] < peer.losses[0]  # three SGD steps on one batch lower its loss
    assert memory["peak_rss"] >= memory["rss_after_imports"] > 0
