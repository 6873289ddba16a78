"""The host half as functions (edge_ft.host.api.export_bundle, edge_ft.analysis.analyze): what the CLI runs."""

import json

import numpy as np
import pytest

from edge_ft.analysis import analyze
from edge_ft.checkpoint import load_safetensors
from edge_ft.cli import main
from edge_ft.config import MethodOptions
from edge_ft.device.bundle import load_bundle
from edge_ft.errors import UserError
from edge_ft.host.api import export_bundle
from tests.test_predict import PICKED, write_class_folders


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("host-api") / "photos", per_class=4)


@pytest.fixture(scope="module")
def exported(photos, base_checkpoint):
    """(folder, the API's manifest): one bundle from export_bundle and one from `edge-ft export`, same settings."""
    manifest = export_bundle(method="lora", base=base_checkpoint, classes=photos, out=photos.parent / "api",
                             options=MethodOptions(rank=4))
    assert main(["export", "--method", "lora", "--base", str(base_checkpoint), "--classes", str(photos), "--rank",
                 "4", "--out", str(photos.parent / "cli")]) == 0
    return photos.parent, manifest


def test_export_bundle_writes_what_the_cli_writes(exported, base_checkpoint, capsys):
    tmp_path, manifest = exported
    cli = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["classes"] == cli["classes"] == sorted(PICKED.values())
    assert manifest["method"] == cli["method"] and manifest["method"]["rank"] == 4
    assert manifest["files"].keys() == cli["files"].keys()
    for name in manifest["files"]:  # the same graphs and weights (a safetensors file, and so a hash of it, may order its tensors anew)
        if name.endswith(".safetensors"):
            ours, theirs = load_safetensors(tmp_path / "api" / name), load_safetensors(tmp_path / "cli" / name)
            assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours), name
        elif name.endswith(".onnx"):
            assert manifest["files"][name]["sha256"] == cli["files"][name]["sha256"], name
    bundle = load_bundle(tmp_path / "api")
    assert bundle.num_classes == 3 and bundle.engine == "ort-step"
    with pytest.raises(UserError, match="already holds a bundle"):
        export_bundle(method="lora", base=base_checkpoint, classes=tmp_path / "photos", out=tmp_path / "api")
    capsys.readouterr()


def test_analyze_describes_a_bundle_as_the_cli_does(exported, capsys):
    bundle = exported[0] / "api"
    report = analyze(bundle, methods=["full", "probe", "lora", "bias"])
    assert report.bundle is not None and list(report.estimates) == ["full", "probe", "lora", "bias"]
    capsys.readouterr()
    assert main(["analyze", "--model", str(bundle), "--methods", "full,probe,lora,bias", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    lora = report.estimates["lora"]
    assert lora.params["trainable"] == 2575  # rank-4 LoRA on fc1, fc2 and a new 3-class head, as exported
    assert json.dumps(cli["methods"]["lora"]["flops"], sort_keys=True) == json.dumps(lora.flops, sort_keys=True)


@pytest.mark.parametrize("call, fragment", [
    (lambda base, photos: analyze(methods=["nope"]), "unknown method 'nope'"),
    (lambda base, photos: export_bundle(method="nope", base=base, out=photos.parent / "x"), "unknown method"),
    (lambda base, photos: export_bundle(method="lora", base=base, classes=photos / "Bag", out=photos.parent / "y"),
     "is a folder with 0 class folder(s)"),
])
def test_bad_input_raises_the_clis_one_line_error(photos, base_checkpoint, call, fragment):
    with pytest.raises(UserError) as raised:
        call(base_checkpoint, photos)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)
