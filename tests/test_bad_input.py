"""Bad input through the real `edge-ft` command line: exit code 2, one line on stderr naming the file, no traceback.

Every case damages a copy of a real ort-step bundle, a real adapter exported from a real run, real MNIST data
or a real profile, then runs `edge_ft.cli.main` in-process. Cases that could crash inside onnxruntime if
validation slipped run as subprocesses, so a segfault fails the test instead of ending the test run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ort_step_support as support
import pytest
from safetensors.numpy import load_file, save_file

from edge_ft.cli import main
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.data.npz import save_npz
from edge_ft.data.readers import read_mnist_5k

REPO = Path(__file__).resolve().parents[1]
LORA, ADAMW = MethodConfig("lora"), OptimizerConfig("adamw", lr=2e-3)  # shared with test_ort_step's exports
A_KEY = "base_model.model.fc1.lora_A.weight"


@dataclass(frozen=True)
class Kit:
    bundle: Path  # pristine ort-step LoRA bundle: copy before damaging (fresh())
    data: Path  # 64 MNIST digits, valid
    run: Path  # a finished `edge-ft train` run of the bundle
    adapter: Path  # `edge-ft adapter export` of that run
    root: Path

    def fresh(self, name: str) -> Path:
        out = self.root / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(self.bundle, out)
        return out


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Kit:
    root = tmp_path_factory.mktemp("bad-input")
    x, y = read_mnist_5k()
    data = root / "digits.npz"
    save_npz(data, x[::70][:64], y[::70][:64])
    bundle = support.bundle_path(LORA, ADAMW)
    run, adapter = root / "run", root / "adapter"
    assert main(["train", str(bundle), "--data", str(data), "--steps", "3", "--threads", "1", "--quiet",
                 "--out", str(run)]) == 0
    assert main(["adapter", "export", str(run), "--out", str(adapter)]) == 0
    return Kit(bundle, data, run, adapter, root)


def one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI; assert exit 2 and exactly one stderr line containing every fragment; return the line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def train_argv(kit: Kit, bundle: Path | None = None, data: Path | None = None, *extra: str) -> list[str]:
    return ["train", str(bundle or kit.bundle), "--data", str(data or kit.data), "--steps", "2", "--threads", "1",
            "--quiet", "--out", str(kit.root / "out"), *extra]


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def flip_byte(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at % len(raw)] ^= 0x10
    path.write_bytes(bytes(raw))


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


# ---------------------------------------------------------------------------------------------------- bundles
BUNDLE_DAMAGE = {
    "missing folder": (lambda b: shutil.rmtree(b), "no such bundle folder"),
    "missing manifest": (lambda b: (b / "manifest.json").unlink(), "manifest.json: missing"),
    "missing file": (lambda b: (b / "train_step.onnx").unlink(), "train_step.onnx: missing from the bundle"),
    "truncated state": (lambda b: truncate(b / "state.safetensors"), "state.safetensors: contents do not match"),
    "bit flip in a graph": (lambda b: flip_byte(b / "forward.onnx", 4000), "forward.onnx: contents do not match"),
    "truncated manifest": (lambda b: truncate(b / "manifest.json", 0.6), "manifest.json: corrupt JSON"),
    "unknown format version": (lambda b: edit_json(b / "manifest.json", lambda m: m.update(format_version=2)),
                               "bundle format version 2"),
    "not a manifest": (lambda b: (b / "manifest.json").write_text("[1, 2]"), "not an edge-ft bundle manifest"),
    "files entry of the wrong type": (lambda b: edit_json(b / "manifest.json", lambda m: m.update(files=[])),
                                      "manifest.json: malformed field"),
    "file record of the wrong type": (
        lambda b: edit_json(b / "manifest.json", lambda m: m["files"].update({"forward.onnx": "abc"})),
        "manifest.json: malformed field"),
    "file outside the bundle": (
        lambda b: edit_json(b / "manifest.json", lambda m: m["files"].update({"../outside": {"sha256": "0",
                                                                                              "bytes": 1}})),
        "outside the bundle"),
    "graph not covered by a hash": (
        lambda b: edit_json(b / "manifest.json", lambda m: m["files"].pop("train_step.onnx")),
        "train_step.onnx is not listed"),
    "unknown engine": (lambda b: edit_json(b / "manifest.json", lambda m: m.update(engine="tvm")),
                       "unknown engine 'tvm'"),
    "shape field of the wrong type": (
        lambda b: edit_json(b / "manifest.json", lambda m: m["trainable"].update({"fc1.lora_A": "2x256"})),
        "manifest.json: malformed field"),
}


@pytest.mark.parametrize("case", BUNDLE_DAMAGE)
def test_damaged_bundle(kit, capsys, case):
    damage, message = BUNDLE_DAMAGE[case]
    bundle = kit.fresh("bundle-" + case.replace(" ", "-"))
    damage(bundle)
    one_line_error(capsys, train_argv(kit, bundle), bundle.name, message)
    assert not (kit.root / "out").exists(), "nothing is written for a refused bundle"


def test_state_file_of_another_bundle_is_refused_before_onnxruntime(kit, tmp_path):
    """The manifest re-hashed over a state file with a wrong-shaped tensor: caught by the engine's own check.

    A subprocess, so an onnxruntime crash would show up as a signal instead of killing the test run."""
    bundle = kit.fresh("bundle-rehashed")
    state = load_file(str(bundle / "state.safetensors"))
    state["fc1.lora_A"] = np.zeros((3, 256), np.float32)
    save_file(state, str(bundle / "state.safetensors"))
    from edge_ft.device.bundle import file_entry

    edit_json(bundle / "manifest.json",
              lambda m: m["files"].update({"state.safetensors": file_entry(bundle / "state.safetensors")}))
    done = subprocess.run([sys.executable, "-m", "edge_ft.cli", *train_argv(kit, bundle)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "state.safetensors: 'fc1.lora_A' is float32 (3, 256), this bundle needs float32 (2, 256)" in done.stderr


# ---------------------------------------------------------------------------------------------------- adapters
def tamper(kit: Kit, name: str, config=None, tensors=None, raw=None, record=None) -> Path:
    out = kit.root / f"adapter-{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(kit.adapter, out)
    if config:
        edit_json(out / "adapter_config.json", config)
    if record:
        edit_json(out / "edge_ft_adapter.json", record)
    if tensors:
        data = load_file(str(out / "adapter_model.safetensors"))
        tensors(data)
        save_file(data, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if raw:
        raw(out)
    return out


def _reshape_rank(t: dict, rank: int) -> None:
    for key in list(t):
        if ".lora_A" in key:
            t[key] = np.zeros((rank, t[key].shape[1]), np.float32)
        elif ".lora_B" in key:
            t[key] = np.zeros((t[key].shape[0], rank), np.float32)


ADAPTER_DAMAGE = {
    "another base model": (dict(record=lambda c: c.update(base_sha256="f" * 64)), "different base model"),
    "another rank": (dict(config=lambda c: c.update(r=4), tensors=lambda t: _reshape_rank(t, 4)), "rank r=4"),
    "another target set": (dict(config=lambda c: c.update(target_modules=["fc1", "fc2"]),
                                tensors=lambda t: [t.pop(k) for k in list(t) if ".fc3." in k]), "adapter targets"),
    "another class count": (dict(record=lambda c: c.update(num_classes=5)), "adapter has 5 classes"),
    "dtype mismatch": (dict(record=lambda c: c.update(dtype="float16")), "the config says float16"),
    "another saved module": (dict(config=lambda c: c.update(modules_to_save=["fc3"])), "adapter modules_to_save"),
    "shape mismatch": (dict(tensors=lambda t: t.update({A_KEY: np.zeros((2, 255), np.float32)})),
                       "has shape (2, 255)"),
    "NaN values": (dict(tensors=lambda t: t[A_KEY].fill(np.nan)), "contains NaN or Inf"),
    "targets of the wrong type": (dict(config=lambda c: c.update(target_modules=["fc1", 3])), "adapter targets"),
    "truncated weights": (dict(raw=lambda a: truncate(a / "adapter_model.safetensors")),
                          "adapter_model.safetensors: not a readable safetensors file"),
    "missing weights": (dict(raw=lambda a: (a / "adapter_model.safetensors").unlink()),
                        "adapter_model.safetensors: no such file"),
    "corrupt config": (dict(raw=lambda a: truncate(a / "adapter_config.json")), "adapter_config.json: corrupt JSON"),
    "corrupt record": (dict(raw=lambda a: truncate(a / "edge_ft_adapter.json")), "edge_ft_adapter.json: corrupt JSON"),
    "record of another format": (dict(record=lambda c: c.update(format_version=3)), "adapter format 3"),
    "record without hashes": (dict(record=lambda c: c.update(files=[])), "not an edge-ft adapter record"),
    "interrupted export": (dict(raw=lambda a: (a / "edge_ft_adapter.json").unlink()),
                           "edge_ft_adapter.json: missing; "),
    "config edited after export": (dict(config=lambda c: c.update(lora_dropout=0.1)),
                                   "adapter_config.json: does not match edge_ft_adapter.json"),
    "weights from another export": (dict(raw=lambda a: flip_byte(a / "adapter_model.safetensors", -3)),
                                    "does not match edge_ft_adapter.json"),
}


@pytest.mark.parametrize("case", ADAPTER_DAMAGE)
def test_mismatched_or_damaged_adapter(kit, capsys, case):
    change, message = ADAPTER_DAMAGE[case]
    adapter = tamper(kit, case.replace(" ", "-"), **change)
    bundle = kit.fresh("bundle-for-adapter")
    before = (bundle / "manifest.json").read_bytes()
    one_line_error(capsys, ["adapter", "apply", str(bundle), str(adapter)], adapter.name, message)
    merged = kit.root / "merged.onnx"
    one_line_error(capsys, ["adapter", "merge", str(bundle), str(adapter), "--out", str(merged)], message)
    assert (bundle / "manifest.json").read_bytes() == before and not merged.exists()


def test_adapter_export_of_a_damaged_run(kit, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(kit.run, run)
    truncate(run / "trained.safetensors")
    one_line_error(capsys, ["adapter", "export", str(run), "--out", str(tmp_path / "a")], "trained.safetensors")
    shutil.copy(kit.run / "trained.safetensors", run / "trained.safetensors")
    truncate(run / "results.json")
    one_line_error(capsys, ["adapter", "export", str(run), "--out", str(tmp_path / "a")], "results.json")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------------- data
def _digits(n: int = 32):
    x, y = read_mnist_5k()
    return x[:n].copy(), y[:n].astype(np.int64)


def _raw_npz(path: Path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


DATA_DAMAGE = {
    "wrong image shape": (lambda p: _raw_npz(p, x=_digits()[0][:, :, :27], y=_digits()[1]), "shape (N, 28, 28)"),
    "labels of another length": (lambda p: _raw_npz(p, x=_digits()[0], y=_digits()[1][:5]), "y must have shape"),
    "NaN pixels": (lambda p: _raw_npz(p, x=np.where(_digits()[0] > 0, np.nan, 0.0), y=_digits()[1]), "NaN/Inf"),
    "Inf pixels": (lambda p: _raw_npz(p, x=np.full((4, 28, 28), np.inf, np.float32), y=np.zeros(4, np.int64)),
                   "NaN/Inf"),
    "pixels out of range": (lambda p: _raw_npz(p, x=_digits()[0] * 300.0, y=_digits()[1]), "0..255"),
    "pixels normalised to 0..1": (lambda p: _raw_npz(p, x=_digits()[0] / 255.0, y=_digits()[1]), "whole numbers"),
    "text pixels": (lambda p: _raw_npz(p, x=np.full((2, 28, 28), "a"), y=np.zeros(2, np.int64)), "non-numeric"),
    "labels above the class range": (lambda p: _raw_npz(p, x=_digits()[0], y=_digits()[1] + 10), "< 10"),
    "negative labels": (lambda p: _raw_npz(p, x=_digits()[0], y=-_digits()[1] - 1), "labels must be >= 0"),
    "float labels": (lambda p: _raw_npz(p, x=_digits()[0], y=_digits()[1] + 0.5), "must be integers"),
    "empty data set": (lambda p: _raw_npz(p, x=np.zeros((0, 28, 28), np.uint8), y=np.zeros(0, np.int64)), "empty"),
    "missing arrays": (lambda p: _raw_npz(p, images=_digits()[0]), "expected arrays 'x' and 'y'"),
    "pickled objects": (lambda p: _raw_npz(p, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1)),
                        "not a readable .npz data file"),
    "truncated file": (lambda p: (save_npz(p, *_digits()), truncate(p)), "not a readable .npz data file"),
    "not a zip at all": (lambda p: p.write_bytes(b"x,y\n1,2\n"), "not a readable .npz data file"),
    "a folder": (lambda p: p.mkdir(), "is a folder, not a .npz data file"),
    "missing file": (lambda p: None, "no such data file"),
}


@pytest.mark.parametrize("case", DATA_DAMAGE)
def test_bad_data(kit, capsys, tmp_path, case):
    make, message = DATA_DAMAGE[case]
    path = tmp_path / "data.npz"
    make(path)
    one_line_error(capsys, train_argv(kit, data=path), path, message)


def test_hints_point_to_the_command_that_helps(kit, capsys, tmp_path):
    from PIL import Image

    png = tmp_path / "seven.png"
    Image.fromarray(_digits()[0][0]).save(png)
    one_line_error(capsys, train_argv(kit, data=png), png, "is an image", "edge-ft data convert FOLDER")
    missing = tmp_path / "train.npz"
    line = one_line_error(capsys, train_argv(kit, data=missing), missing, "no such data file", "data convert")
    assert line.index("data convert") < line.index("data export")  # your own images first, built-in tasks second
    wide = tmp_path / "twelve.npz"
    _raw_npz(wide, x=_digits()[0], y=_digits()[1] + 2)  # labels 2..11 for a 10-class bundle
    one_line_error(capsys, train_argv(kit, data=wide), "< 10, got 2..11",
                   f"export a bundle for this data's 12 (`edge-ft export --classes {wide}` or --num-classes 12)")
    model = kit.run / "model.onnx"
    one_line_error(capsys, train_argv(kit, bundle=model), model, "is a file, not a bundle folder", "edge-ft predict")
    cut = tmp_path / "model.onnx"
    cut.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    line = one_line_error(capsys, ["predict", str(cut), str(png)], cut, "corrupt or truncated")
    assert "Protobuf" not in line and "ONNXRuntimeError" not in line


# ---------------------------------------------------------------------------------------------------- profiles
PROFILE = ('description = "test board"\narch = "aarch64"\ncpu = "4x A53"\ncores = 4\nram_mb = 1024\n'
           'budget_mb = 768\nthreads = 4\ncpu_speed = 0.05\ncpu_speed_source = "estimate"\n')
PROFILE_DAMAGE = {
    "unknown key": (PROFILE + "gpu = true\n", "unknown key 'gpu'"),
    "budget above RAM": (PROFILE.replace("budget_mb = 768", "budget_mb = 4096"), "exceeds ram_mb"),
    "zero cores": (PROFILE.replace("cores = 4", "cores = 0").replace("threads = 4", "threads = 0"),
                   "must be a positive integer"),
    "more threads than cores": (PROFILE.replace("threads = 4", "threads = 8"), "exceeds cores"),
    "negative speed": (PROFILE.replace("cpu_speed = 0.05", "cpu_speed = -1.0"), "must be a positive number"),
    "infinite speed": (PROFILE.replace("cpu_speed = 0.05", "cpu_speed = inf"), "must be a positive number"),
    "text where a number goes": (PROFILE.replace("ram_mb = 1024", 'ram_mb = "1 GB"'), "must be int"),
    "unknown architecture": (PROFILE.replace("aarch64", "mips"), "not a known architecture"),
    "missing key": (PROFILE.replace("cores = 4\n", ""), "missing key 'cores'"),
    "invalid TOML": (PROFILE + "cores = \n", "not valid TOML"),
    "not UTF-8": (b"\xff\xfe" + PROFILE.encode("utf-16-le"), "not valid TOML"),
}


@pytest.mark.parametrize("case", PROFILE_DAMAGE)
def test_bad_profile(kit, capsys, tmp_path, case):
    text, message = PROFILE_DAMAGE[case]
    path = tmp_path / "board.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    one_line_error(capsys, ["profile", "show", str(path)], path, message)
    one_line_error(capsys, train_argv(kit, None, None, "--profile", str(path)), path, message)


def test_unknown_profile_name_or_path(kit, capsys, tmp_path):
    one_line_error(capsys, ["profile", "run", "no-such-board", "--", "true"], "no device profile named")
    one_line_error(capsys, train_argv(kit, None, None, "--profile", str(tmp_path / "gone.toml")), "gone.toml",
                   "no such profile file")


# ---------------------------------------------------------------------------------------------------- paths
@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write into: a read-only tmpfs for root (who ignores permission bits), else chmod."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", str(folder)], check=True)


def test_out_in_a_read_only_folder(kit, capsys, read_only_dir):
    target = read_only_dir / "run"
    one_line_error(capsys, train_argv(kit)[:-1] + [str(target)], target, "not writable")
    one_line_error(capsys, ["adapter", "export", str(kit.run), "--out", str(target)], target, "not writable")
    one_line_error(capsys, ["adapter", "merge", str(kit.bundle), str(kit.adapter), "--out", str(target / "m.onnx")],
                   "not writable")
    one_line_error(capsys, ["adapter", "apply", str(kit.bundle), str(read_only_dir)], "adapter_config.json: missing")


def test_out_is_a_file_or_under_a_file(kit, capsys, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    one_line_error(capsys, train_argv(kit)[:-1] + [str(a_file)], a_file, "is a file, not a folder")
    one_line_error(capsys, train_argv(kit)[:-1] + [str(a_file / "run")], a_file, "is a file")
    one_line_error(capsys, ["adapter", "export", str(kit.run), "--out", str(a_file / "adapter")], a_file, "is a file")
    one_line_error(capsys, ["adapter", "merge", str(kit.bundle), str(kit.adapter), "--out", str(tmp_path)],
                   tmp_path, "is a folder")
    one_line_error(capsys, ["export", "--method", "lora", "--base", str(support.base_path()), "--out",
                            str(a_file / "bundle"), "--engine", "ort-step"], a_file, "is a file")
    assert a_file.read_text() == "not a folder"


def test_base_checkpoint_damage_is_one_line(kit, capsys, tmp_path):
    """`edge-ft export --base` reads the base before any torch work: truncated, foreign, or not matching its JSON."""
    base = tmp_path / "base.safetensors"
    shutil.copy(support.base_path(), base)
    shutil.copy(support.base_path().with_suffix(".json"), base.with_suffix(".json"))
    argv = ["export", "--method", "lora", "--base", str(base), "--out", str(tmp_path / "bundle"),
            "--engine", "ort-step"]
    flip_byte(base, -5)
    one_line_error(capsys, argv, "base.json", "does not match")
    truncate(base)
    one_line_error(capsys, argv, base, "not a readable safetensors file")
    save_file({"fc3.bias": np.zeros((), np.float32)}, str(base))
    base.with_suffix(".json").unlink()
    one_line_error(capsys, argv, base, "fc3.bias")
    assert not (tmp_path / "bundle").exists()


def test_running_out_of_memory_is_one_line(kit, capsys, monkeypatch):
    """Under a memory cap Python raises MemoryError (an rlimit, `ulimit -v`): one line the emulator classifies."""
    import edge_ft.data.npz
    from edge_ft.emulation.emulate import _OOM_TEXT

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(edge_ft.data.npz, "load_labelled_npz", no_memory)
    line = one_line_error(capsys, train_argv(kit), "out of memory", "--batch")
    assert _OOM_TEXT.search(line)
