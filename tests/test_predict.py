"""Your own classes end to end: image folders -> named .npz -> bundle -> device training -> model card -> predict."""

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_ft.cli import main
from edge_ft.data.npz import load_labelled_npz
from edge_ft.data.readers import read_fashion
from edge_ft.device.engines.onnx_wire import with_metadata
from edge_ft.device.ort_api import inference_session

FIXTURE = Path(__file__).parent / "fixtures" / "fashion-mnist"
PICKED = {1: "Trouser", 7: "Sneaker", 8: "Bag"}  # Fashion-MNIST labels of three easy-to-tell classes


def write_class_folders(root: Path, per_class: int = 12, skip: int = 0) -> Path:
    """root/<name>/*.png from the committed Fashion-MNIST fixture (after the first `skip` of each class); every
    other image dark-on-light and 2x size, as photos of a page would be, so reading must invert and resize them."""
    (x, y), (xt, yt) = read_fashion("train", FIXTURE), read_fashion("test", FIXTURE)
    x, y = np.concatenate([x, xt]), np.concatenate([y, yt])  # 200 images: 16 to 24 of each picked class
    for label, name in PICKED.items():
        (root / name).mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(y == label)[skip : skip + per_class]):
            pixels = x[idx] if i % 2 else 255 - x[idx]
            Image.fromarray(pixels).resize((56, 56)).save(root / name / f"{i:02d}.png")
    return root


@cache
def trained_run(tmp: Path, base: Path) -> tuple[Path, Path, Path]:
    """(run, data folder, image folder): a probe for the 3 named classes, trained on the device side."""
    images = write_class_folders(tmp / "images")
    assert main(["data", "convert", str(images), "--out", str(tmp / "data"), "--test-fraction", "0.25"]) == 0
    assert main(["export", "--method", "probe", "--base", str(base), "--classes", str(tmp / "data" / "train.npz"),
                 "--out", str(tmp / "bundle")]) == 0
    assert main(["train", str(tmp / "bundle"), "--data", str(tmp / "data" / "train.npz"), "--eval",
                 str(tmp / "data" / "test.npz"), "--epochs", "30", "--batch", "9", "--threads", "1", "--quiet",
                 "--out", str(tmp / "run")]) == 0
    return tmp / "run", tmp / "data", images


@pytest.fixture(scope="module")
def run(tmp_path_factory, base_checkpoint):
    return trained_run(tmp_path_factory.mktemp("own-classes"), base_checkpoint)


def test_class_names_travel_from_folders_to_the_model(run):
    run_dir, data, _ = run
    x, y, classes = load_labelled_npz(data / "train.npz")
    assert classes == sorted(PICKED.values())  # labels follow the sorted folder names
    x_test, y_test, test_classes = load_labelled_npz(data / "test.npz")
    assert test_classes == classes and len(y) == 27 and len(y_test) == 9  # 25% of each class held out
    assert np.bincount(y_test).tolist() == [3, 3, 3]
    manifest = json.loads((run_dir.parent / "bundle" / "manifest.json").read_text())
    assert manifest["classes"] == classes and manifest["num_classes"] == 3 and manifest["engine"] == "ort-step"
    assert json.loads((run_dir / "results.json").read_text())["classes"] == classes
    meta = inference_session(run_dir / "model.onnx").get_modelmeta().custom_metadata_map
    assert json.loads(meta["edge_ft.classes"]) == classes
    assert json.loads(meta["edge_ft.preprocessing"])["divisor"] == 255.0


def test_predict_on_the_test_npz_scores_what_training_scored(run, capsys):
    run_dir, data, _ = run
    assert main(["predict", str(run_dir), str(data / "test.npz"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scored"] == 9
    assert out["accuracy"] == json.loads((run_dir / "results.json").read_text())["accuracy"]
    assert {p["top"][0]["class"] for p in out["predictions"]} <= set(PICKED.values())


def test_predict_on_pngs_names_classes_and_ranks_them(run, capsys):
    run_dir, _, images = run
    assert main(["predict", str(run_dir / "model.onnx"), str(images / "Bag"), str(images / "Trouser" / "00.png"),
                 "--top-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["predictions"]) == 13
    for p in out["predictions"]:
        probs = [t["probability"] for t in p["top"]]
        assert [t["class"] for t in p["top"]] != [] and sorted(probs, reverse=True) == probs
        assert abs(sum(probs) - 1) < 1e-4  # all 3 classes listed
        assert p["label"] == Path(p["input"]).parent.name
    assert out["accuracy"] >= 0.8  # seen images of easy classes (inverted and resized ones included)
    assert main(["predict", str(run_dir), str(images / "Sneaker" / "01.png")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.split()[1] in PICKED.values()


def test_a_model_without_its_card_is_refused(run, tmp_path, capsys):
    """A foreign or stripped model would be fed guessed inputs: refuse it instead of answering wrongly."""
    run_dir, data, _ = run
    stripped = tmp_path / "stripped.onnx"
    stripped.write_bytes(with_metadata((run_dir / "model.onnx").read_bytes(), {}, "edge_ft."))
    assert main(["predict", str(stripped), str(data / "test.npz")]) == 2
    assert "does not say how its input was scaled" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["bundle", "missing", "mixed npz", "no images"])
def test_predict_mistakes_are_one_line(run, tmp_path, capsys, case):
    run_dir, data, images = run
    (tmp_path / "empty").mkdir()
    argv, fragment = {
        "bundle": ([str(run_dir.parent / "bundle"), str(images)], "is a bundle"),
        "missing": ([str(tmp_path / "nope"), str(images)], "no such model file or run folder"),
        "mixed npz": ([str(run_dir), str(data / "test.npz"), str(images)], "give one .npz alone"),
        "no images": ([str(run_dir), str(tmp_path / "empty")], "no images"),
    }[case]
    assert main(["predict", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_predict_reads_transparent_images_and_refuses_flat_ones(run, tmp_path, capsys):
    """A drawing saved as black strokes on a transparent page used to read as an all-black image."""
    run_dir, _, images = run
    grey = np.asarray(Image.open(images / "Trouser" / "01.png"))  # white on black
    rgba = np.zeros((*grey.shape, 4), np.uint8)
    rgba[..., 3] = grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "drawn.png")
    assert main(["predict", str(run_dir), str(tmp_path / "drawn.png"), str(images / "Trouser" / "01.png"),
                 "--json"]) == 0
    first, second = json.loads(capsys.readouterr().out)["predictions"]
    assert first["top"] == second["top"]
    Image.fromarray(np.zeros_like(rgba), "RGBA").save(tmp_path / "blank.png")
    assert main(["predict", str(run_dir), str(tmp_path / "blank.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blank.png" in err[0] and "flat grey level" in err[0]


def test_training_refuses_data_whose_class_names_differ_from_the_bundles(run, tmp_path, capsys):
    run_dir, data, _ = run
    x, y, classes = load_labelled_npz(data / "train.npz")
    from edge_ft.data.npz import save_npz

    save_npz(tmp_path / "other.npz", x, y, ["cat", "dog", "bird"])
    assert main(["train", str(run_dir.parent / "bundle"), "--data", str(tmp_path / "other.npz"), "--steps", "1",
                 "--quiet", "--out", str(tmp_path / "r")]) == 2
    assert "labels would mean different things" in capsys.readouterr().err


def test_a_finished_run_is_not_overwritten_without_force(run, tmp_path, capsys):
    run_dir, data, _ = run
    argv = ["train", str(run_dir.parent / "bundle"), "--data", str(data / "train.npz"), "--steps", "1", "--quiet",
            "--threads", "1", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    before = (tmp_path / "r" / "results.json").read_bytes()
    assert main(argv) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert (tmp_path / "r" / "results.json").read_bytes() == before
    assert main([*argv, "--force"]) == 0
    assert main(["train", str(tmp_path / "r"), "--data", str(data / "train.npz"), "--steps", "1"]) == 2
    assert "this is a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["split on folders", "fraction on IDX", "too few names", "npz out with fraction"])
def test_convert_refuses_options_that_do_not_apply(tmp_path, capsys, case):
    images = write_class_folders(tmp_path / "images", per_class=2)
    argv, fragment = {
        "split on folders": ([str(images), "--out", str(tmp_path / "d.npz"), "--split", "test"],
                             "--split applies to IDX folders only"),
        "fraction on IDX": ([str(FIXTURE), "--out", str(tmp_path / "d"), "--test-fraction", "0.2"],
                            "has its own test split"),
        "too few names": ([str(images), "--out", str(tmp_path / "d.npz"), "--classes", "a,b"], "names 2 classes"),
        "npz out with fraction": ([str(images), "--out", str(tmp_path / "d.npz"), "--test-fraction", "0.5"],
                                  "--out is a folder"),
    }[case]
    assert main(["data", "convert", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "d.npz").exists() and not (tmp_path / "d").exists()


def test_convert_renames_classes_and_reads_names_back(tmp_path):
    images = write_class_folders(tmp_path / "images", per_class=2)
    assert main(["data", "convert", str(images), "--out", str(tmp_path / "d.npz"), "--classes", "b,s,t"]) == 0
    assert load_labelled_npz(tmp_path / "d.npz")[2] == ["b", "s", "t"]
    assert main(["data", "convert", str(tmp_path / "d.npz"), "--out", str(tmp_path / "e.npz")]) == 0
    assert load_labelled_npz(tmp_path / "e.npz")[2] == ["b", "s", "t"]  # a .npz keeps its names through convert


def test_reading_images_without_pillow_names_the_device_install(tmp_path, monkeypatch, capsys):
    images = write_class_folders(tmp_path / "images", per_class=2)
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)  # as on a device install without pillow
    assert main(["data", "convert", str(images), "--out", str(tmp_path / "d.npz")]) == 2
    err = capsys.readouterr().err
    assert "needs pillow" in err and "whl[device,images]" in err


def test_class_names_survive_adapter_export_and_merge(run, tmp_path, capsys):
    run_dir, data, images = run
    bundle = run_dir.parent / "bundle"
    assert main(["adapter", "export", str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
    record = json.loads((tmp_path / "adapter" / "edge_ft_adapter.json").read_text())
    assert record["classes"] == sorted(PICKED.values())
    assert main(["adapter", "merge", str(bundle), str(tmp_path / "adapter"), "--out", str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "m.onnx"), str(data / "test.npz"), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["classes"] == sorted(PICKED.values())
    assert main(["predict", str(run_dir), str(data / "test.npz"), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    def classes(out):
        return [p["top"][0]["class"] for p in out["predictions"]]

    assert classes(merged) == classes(trained)
