"""Property tests: every loader turns random bytes and mutated valid files into a clean UserError or a correct load.

Mutations of real files: truncation, bit flips, byte insertions, random bytes, and for JSON/TOML a random value
(any type, NaN included) put at a random place in the document or a key deleted. Any exception other than
UserError is a failure: that would be a traceback for the user. Also: nothing on a load path can unpickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import ort_step_support as support
import pytest
import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_ft.checkpoint import load_base, save_base
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.data.npz import load_npz, save_npz
from edge_ft.data.readers import read_mnist_5k
from edge_ft.device.adapter import CONFIG, RECORD, WEIGHTS, check_adapter, load_adapter, peft_key
from edge_ft.device.bundle import load_bundle
from edge_ft.device.engines import open_engine
from edge_ft.emulation.profiles import load_profile_file
from edge_ft.errors import UserError

REPO = Path(__file__).resolve().parents[1]
LORA, ADAMW = MethodConfig("lora"), OptimizerConfig("adamw", lr=2e-3)  # shared with test_ort_step's exports
# 60 examples per loader in the suite; EDGE_FT_FUZZ_EXAMPLES=1000 for a deeper run by hand.
FUZZ = settings(max_examples=int(os.environ.get("EDGE_FT_FUZZ_EXAMPLES", 60)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
PROFILE = (REPO / "edge_ft" / "emulation" / "device_profiles" / "rpi-3b.toml").read_bytes()


# ------------------------------------------------------------------------------------------------ strategies
def byte_mutations(data: bytes) -> st.SearchStrategy[bytes]:
    n = len(data)

    def flip(flips):
        out = bytearray(data)
        for at, bit in flips:
            out[at] ^= 1 << bit
        return bytes(out)

    return st.one_of(
        st.integers(0, n - 1).map(lambda k: data[:k]),  # cut short in transfer
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 7)), min_size=1, max_size=8).map(flip),
        st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=16)).map(
            lambda t: data[:t[0]] + t[1] + data[t[0]:]),  # bytes inserted
        st.binary(max_size=4096),  # not the file at all
    )


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def document_edits(doc: dict, values=ANY_JSON) -> st.SearchStrategy[dict]:
    """`doc` with one node replaced by a random value, or one key deleted."""
    paths = [p for p in _paths(doc) if p]

    def edit(args):
        path, value, delete = args
        out = json.loads(json.dumps(doc))
        node = out
        for key in path[:-1]:
            node = node[key]
        if delete and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return out

    return st.tuples(st.sampled_from(paths), values, st.booleans()).map(edit)


def loads_or_refuses(load):
    """Run a loader: a UserError is a clean refusal; return the loaded value or None."""
    try:
        return load()
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(e)  # one non-empty line
        return None


# ------------------------------------------------------------------------------------------------ fixtures
@cache
def bundle_dir() -> Path:
    return support.bundle_path(LORA, ADAMW)


@cache
def adapter_files(legacy: bool = False) -> dict[str, bytes]:
    """{file name: bytes} of an adapter that fits bundle_dir(): the current layout (edge-ft's record beside PEFT's
    config, hashing both), or format 1 (the record inside adapter_config.json, no weights hash: the safetensors
    parser itself meets the mutated bytes)."""
    from safetensors.numpy import save

    bundle = load_bundle(bundle_dir())
    rng = np.random.default_rng(0)
    tensors = {peft_key(n): rng.standard_normal(s).astype(np.float32) for n, s in bundle.trainable.items()}
    weights = save(tensors, metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4.0, "target_modules": ["fc1", "fc2", "fc3"],
              "bias": "none"}
    record = {"method": "lora", "base_sha256": bundle.base_sha256, "num_classes": 10, "dtype": "float32"}
    if legacy:
        return {CONFIG: json.dumps({**config, "edge_ft": {**record, "format_version": 1}}).encode(), WEIGHTS: weights}
    config = json.dumps(config).encode()
    files = {WEIGHTS: hashlib.sha256(weights).hexdigest(), CONFIG: hashlib.sha256(config).hexdigest()}
    record = {"format": "edge-ft-adapter", "format_version": 2, **record, "classes": None, "files": files}
    return {CONFIG: config, WEIGHTS: weights, RECORD: json.dumps(record).encode()}


@cache
def npz_bytes(compressed: bool) -> bytes:
    x, y = read_mnist_5k()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        if compressed:
            save_npz(path, x[:12], y[:12])
        else:
            np.savez(path, x=x[:12], y=y[:12].astype(np.int64))
        return path.read_bytes()


@cache
def base_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_base(Path(tmp) / "b.safetensors", support.base_state(), {"task": "fuzz"})
        return (Path(tmp) / "b.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------------ loaders
def _load_bundle_with(manifest: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bundle"
        shutil.copytree(bundle_dir(), folder)
        (folder / "manifest.json").write_bytes(manifest)
        bundle = loads_or_refuses(lambda: load_bundle(folder))
        if bundle is not None:  # whatever loads must also open and step, or refuse cleanly
            engine = loads_or_refuses(lambda: open_engine(bundle, threads=1))
            if engine is not None:
                x = np.zeros((2, *bundle.input_shape), np.float32)
                loads_or_refuses(lambda: engine.train_step(x, np.zeros(2, np.int64), 1e-3))


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_bundle_manifest_mutations(data):
    manifest = (bundle_dir() / "manifest.json").read_bytes()
    if data.draw(st.booleans()):
        mutated = data.draw(byte_mutations(manifest))
    else:
        mutated = json.dumps(data.draw(document_edits(json.loads(manifest)))).encode()
    _load_bundle_with(mutated)


def _load_adapter_with(files: dict[str, bytes]):
    bundle = load_bundle(bundle_dir())
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        adapter = loads_or_refuses(lambda: load_adapter(tmp))
        if adapter is not None:
            accepted = loads_or_refuses(lambda: (check_adapter(bundle, adapter), True)[1])
            if accepted:  # a correct load: exactly the bundle's trainable tensors, finite, right shapes
                assert {k: v.shape for k, v in adapter.tensors.items()} == bundle.trainable
                assert all(np.isfinite(v).all() for v in adapter.tensors.values())


def _mutated(data, files: dict[str, bytes], name: str) -> dict[str, bytes]:
    """`files` with one JSON file's bytes mutated, or one node of its document edited."""
    if data.draw(st.booleans()):
        return {**files, name: data.draw(byte_mutations(files[name]))}
    return {**files, name: json.dumps(data.draw(document_edits(json.loads(files[name])))).encode()}


@FUZZ
@given(data=st.data())
@pytest.mark.parametrize("name, legacy", [(CONFIG, False), (RECORD, False), (CONFIG, True)],
                         ids=["config", "record", "format-1-config"])
def test_adapter_config_mutations(name, legacy, data):
    _load_adapter_with(_mutated(data, adapter_files(legacy), name))


@FUZZ
@given(data=st.data())
def test_adapter_weights_mutations(data):
    files = adapter_files()
    _load_adapter_with({**files, WEIGHTS: data.draw(byte_mutations(files[WEIGHTS]))})


@FUZZ
@given(data=st.data())
def test_base_checkpoint_mutations(data):
    from edge_ft.host.export.common import check_base
    from edge_ft.model_desc import lenet5

    mutated = data.draw(byte_mutations(base_bytes()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.safetensors"
        path.write_bytes(mutated)
        loaded = loads_or_refuses(lambda: load_base(path))
        if loaded is not None:
            state, meta = loaded
            if loads_or_refuses(lambda: (check_base(state, path, lenet5()), True)[1]):
                assert state["fc3.bias"].shape == (meta["num_classes"],)


@FUZZ
@given(compressed=st.booleans(), data=st.data())
def test_npz_mutations(compressed, data):
    mutated = data.draw(byte_mutations(npz_bytes(compressed)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        path.write_bytes(mutated)
        loaded = loads_or_refuses(lambda: load_npz(path, num_classes=10))
        if loaded is not None:
            x, y = loaded
            assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[1:] == (28, 28) and len(x) > 0
            assert y.dtype == np.int64 and y.shape == (len(x),) and y.min() >= 0 and y.max() < 10


TOML_VALUES = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=10),
                        st.lists(st.integers(0, 9), max_size=3), st.dates())


def _toml(doc: dict) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(i) for i in v) + "]"
        return str(v)

    return "".join(f"{k} = {value(v)}\n" for k, v in doc.items())


@FUZZ
@given(data=st.data())
def test_profile_mutations(data):
    choice = data.draw(st.integers(0, 2))
    if choice == 0:
        mutated = data.draw(byte_mutations(PROFILE))
    else:
        doc = tomllib.loads(PROFILE.decode())
        key = data.draw(st.sampled_from(sorted(doc)) | st.text(min_size=1, max_size=6).filter(str.isidentifier))
        if choice == 1 and key in doc:
            del doc[key]
        else:
            doc[key] = data.draw(TOML_VALUES)
        mutated = _toml(doc).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "board.toml"
        path.write_bytes(mutated)
        profile = loads_or_refuses(lambda: load_profile_file(path))
        if profile is not None:
            assert 1 <= profile.threads <= profile.cores and 1 <= profile.budget_mb <= profile.ram_mb
            assert math.isfinite(profile.cpu_speed) and profile.cpu_speed > 0


@FUZZ
@given(data=st.data())
def test_resume_record_mutations(data):
    from dataclasses import asdict

    from edge_ft.checkpoint import sha256_file
    from edge_ft.device.resume import RESUME, Progress, start

    identity = {"bundle_manifest_sha256": "a" * 64, "data_sha256": "b" * 64, "settings": {"batch": 16}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "step-000005.state").write_bytes(b"state")
        record = {"format": "edge-ft-resume", "format_version": 1, "state": "checkpoints/step-000005.state",
                  "state_sha256": sha256_file(out / "checkpoints" / "step-000005.state"), "run": identity,
                  "progress": asdict(Progress(step=5, batch=5, losses=[1.0] * 5))}
        raw = json.dumps(record).encode()
        mutated = data.draw(byte_mutations(raw)) if data.draw(st.booleans()) else json.dumps(
            data.draw(document_edits(record))).encode()
        (out / RESUME).write_bytes(mutated)
        started = loads_or_refuses(lambda: start(out, identity, resume=True))
        if started is not None:
            progress, state = started
            assert isinstance(progress, Progress) and (state is None or state.is_file())


@cache
def finished_run() -> Path:
    """A real `edge-ft train` run folder (2 steps) of bundle_dir(), for `edge-ft adapter export`."""
    from edge_ft.cli import main

    x, y = read_mnist_5k()
    folder = Path(tempfile.mkdtemp(dir=support._ROOT))
    save_npz(folder / "d.npz", x[:40], y[:40])
    assert main(["train", str(bundle_dir()), "--data", str(folder / "d.npz"), "--steps", "2", "--threads", "1",
                 "--quiet", "--out", str(folder / "run")]) == 0
    return folder / "run"


@FUZZ
@given(data=st.data())
def test_run_record_mutations_for_adapter_export(data):
    from edge_ft.device.adapter import export_adapter

    record = json.loads((finished_run() / "results.json").read_text())
    mutated = json.dumps(data.draw(document_edits({"bundle": record["bundle"]})))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(finished_run(), run)
        (run / "results.json").write_text(mutated)
        record = loads_or_refuses(lambda: export_adapter(run, Path(tmp) / "adapter"))
        if record is not None:  # what was written loads back and fits the bundle it came from
            adapter = load_adapter(Path(tmp) / "adapter")
            assert adapter.record == record and set(adapter.tensors) == set(load_bundle(bundle_dir()).trainable)


# ------------------------------------------------------------------------------------------------ no pickle
PICKLE = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|shelve)\b|\bpickle\.(load|loads|Unpickler)\b|"
                    r"torch\.load\(|allow_pickle\s*=\s*True|np\.load\((?![^)]*allow_pickle=False)")


def test_no_pickle_on_any_load_path():
    """Data files never load code: no pickle, torch.load, allow_pickle=True or np.load without allow_pickle=False."""
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
            for p in sorted((REPO / "edge_ft").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if PICKLE.search(line) and not line.lstrip().startswith("#")]
    assert not hits, "\n".join(hits)
    assert all(PICKLE.search(bad) for bad in ("x = np.load(path)", "import pickle", "torch.load(f)",
                                              "np.load(p, allow_pickle=True)", "pickle.loads(b)"))
    assert not PICKLE.search("np.load(path, allow_pickle=False)")


WRITE = re.compile(r"(?<!atomic_)open\([^)]*['\"][wax]b?\+?['\"]|\.write_(text|bytes)\(|"
                   r"np\.save(z|z_compressed)?\((?!f,)|"
                   r"\bsave_file\(|onnx\.save\(|torch\.save\(|savefig\((?!buf)|json\.dump\((?!.*sys\.stdout)")
# Writes that are not files a user keeps: each one says why it may bypass edge_ft.atomic.
WRITE_ALLOWED = {
    "edge_ft/atomic.py": "the atomic writers themselves",
    "edge_ft/bench/executorch_peer.py": "runs in the peers' venv on torch and executorch alone; its one file is a "
                                        "scratch program in the measuring run's own temporary folder",
    "edge_ft/device/metrics.py": "/proc/self/clear_refs is a kernel interface, not a file",
    "edge_ft/bench/records.py": "results.jsonl is an fsynced append-only journal; a torn last line is skipped",
    "edge_ft/emulation/cgroups.py": "cgroup control files are kernel interfaces, not files",
    "edge_ft/emulation/enter.py": "writes its pid into a cgroup's procs file",
    "edge_ft/emulation/lifetime.py": "cgroup control files (cgroup.kill, quotas) are kernel interfaces, not files",
    "edge_ft/host/export/ort_training.py": "edits a temp copy that is then written into the bundle atomically",
    "edge_ft/gates/cireport.py": "appends to the CI system's $GITHUB_STEP_SUMMARY, a file the CI runner owns",
    "edge_ft/fleet/deploy.py": "the SuperLink's and the run's logs are streamed by the running processes",
    "edge_ft/fleet/processes.py": "a SuperNode's log is streamed by the running process",
}


def test_every_file_write_goes_through_atomic():
    """A crash must leave the previous good file: writes go through edge_ft.atomic (temp file, fsync, rename)."""
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
            for p in sorted((REPO / "edge_ft").rglob("*.py")) if p.relative_to(REPO).as_posix() not in WRITE_ALLOWED
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if WRITE.search(line) and not line.lstrip().startswith("#")]
    assert not hits, "\n".join(hits)
    assert all(WRITE.search(bad) for bad in ('open(p, "w")', "p.write_text(s)", "np.savez(path, x=x)",
                                              "onnx.save(m, p)", "fig.savefig(path)", "json.dump(d, f)"))
    assert not any(WRITE.search(ok) for ok in ('with atomic_open(path, "wb") as f:', "np.savez_compressed(f, x=x)",
                                               "fig.savefig(buf, format='png')", "json.dump(r, sys.stdout)"))
