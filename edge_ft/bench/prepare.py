"""Host-side preparation for a sweep, done once, unconfined, and cached next to the results file.

    <results folder>/prep/base.safetensors             pretrain_base (`edge-ft pretrain`; when no --base is given)
    <results folder>/prep/data/<task>/{train,test}.npz export_task (`edge-ft data export`)
    <results folder>/prep/bundles/<base>/<engine>-<m>  export_bundle (`edge-ft export`) per method and ORT engine
    <results folder>/prep/models/<model>/base.safetensors and bundles/<base>-ort-step-<method>: a model sweep's
                                                       (`edge-ft bench --models`), the network's seeded initialisation
    <results folder>/prep/pythonpath/edge_ft            link to this edge_ft, put first on the children's path
Each step is skipped when its output is there and matches (same base sha256, same method settings), so an
interrupted sweep resumes where it stopped. Each step calls the library function behind its command, all in one
child process (`prepare_in_child`): one torch import for the lot, and the sweep process itself never loads torch.
That matters for memory figures: Linux keeps a process's RSS high-water mark across fork and exec, so every job's
ru_maxrss starts at its spawner's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import edge_ft
from edge_ft.config import MethodConfig
from edge_ft.contracts import MANIFEST, METHOD_LABELS, ORT_STEP
from edge_ft.errors import UserError

LENET5 = "lenet5"
# Models a sweep can measure: LeNet-5 and edge_ft.host.models.REFERENCE_MODELS (named here without importing torch).
MODEL_NAMES = (LENET5, "resnet8", "ds-cnn", "mobilenet-v1-0.25")
MODEL_LABELS = METHOD_LABELS  # what a model sweep measures: every label, most trained first
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-training-cpu", "onnxruntime-training")  # whichever is installed
# Wheels that exist per engine: torch publishes x86_64 and aarch64; onnxruntime-training only x86_64 (Linux,
# Windows); standard onnxruntime x86_64 and aarch64 (not 32-bit ARM).
INSTALLABLE_ARCHES = {"torch": ("x86_64", "aarch64"), "ort-training": ("x86_64",), "ort-step": ("x86_64", "aarch64")}


def installable(engine: str, arch: str) -> bool:
    return arch in INSTALLABLE_ARCHES[engine]


@dataclass
class Prepared:
    root: Path  # the results folder
    base: Path  # base weights every run starts from
    base_sha256: str
    device_python: str  # interpreter for ort-step runs (standard onnxruntime, what a board installs)
    host_python: str  # interpreter for torch and ort-training runs (the onnxruntime-training wheel)
    data: dict[str, Path] = field(default_factory=dict)  # task name -> folder with train.npz / test.npz
    bundles: dict[tuple[str, str], Path] = field(default_factory=dict)  # (method label, engine) -> bundle
    _versions: dict[str, dict] = field(default_factory=dict)

    @property
    def prep(self) -> Path:
        return self.root / "prep"

    def python_for(self, engine: str) -> str:
        return self.device_python if engine == ORT_STEP else self.host_python

    def child_env(self) -> dict[str, str]:
        """The parent's environment with this edge_ft first on the path: an interpreter whose site-packages hold
        an older installed copy (the device venv installs a snapshot) still runs the code under test."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath_shim(self.prep)), env.get("PYTHONPATH"))
                                            if p)
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        return env

    def versions(self, engine: str) -> dict:
        """Python, numpy and the engine's runtime in the interpreter that runs `engine` (asked once each)."""
        python = self.python_for(engine)
        if python not in self._versions:
            self._versions[python] = runtime_versions(python)
        runtime = self._versions[python]
        wanted = ("torch",) if engine == "torch" else ORT_DISTRIBUTIONS
        return {"python": runtime.get("python"), "numpy": runtime.get("numpy"), "edge_ft": edge_ft.__version__,
                "interpreter": python, **{k: runtime[k] for k in wanted if runtime.get(k)}}


def runtime_versions(python: str) -> dict:
    """Installed distributions the interpreter sees, read from metadata (nothing heavy is imported)."""
    code = ("import importlib.metadata as m, json, platform\nout = {'python': platform.python_version()}\n"
            "for d in ('numpy', 'torch', 'onnxruntime', 'onnxruntime-training-cpu', 'onnxruntime-training'):\n"
            "    try: out[d] = m.version(d)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    from edge_ft.emulation.lifetime import run

    try:  # a child like any other the sweep starts: it ends with the sweep, however the sweep ends
        done = run([python, "-c", code], "the version query", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   text=True)
        return json.loads(done.stdout) if done.returncode == 0 else {}
    except (OSError, json.JSONDecodeError):
        return {}


def pythonpath_shim(prep: Path) -> Path:
    """A folder holding only a link named edge_ft to this package (nothing else leaks onto the child's path)."""
    folder = prep / "pythonpath"
    link = folder / "edge_ft"
    target = Path(edge_ft.__file__).resolve().parent
    if not (link.is_symlink() and Path(os.readlink(link)) == target):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".edge_ft.{os.getpid()}.{threading.get_ident()}"  # --parallel runs make it side by side
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)
    return folder


def ensure_data(root: Path, task: str) -> tuple[Path, int]:
    """(folder with the task's train.npz and test.npz, class count), exported once; a data folder is its own."""
    from edge_ft.data.tasks import export_task, get_task

    if Path(task).is_dir():
        return Path(task), data_classes(Path(task))
    folder = root / "prep" / "data" / get_task(task).slug
    info = folder / "task.json"
    if not all((folder / f).is_file() for f in ("train.npz", "test.npz", "task.json")):
        export_task(task, folder)
    try:
        return folder, int(json.loads(info.read_text())["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{info}: unreadable ({e}); delete {folder} and re-run") from None


def data_classes(folder: Path) -> int:
    """The class count of a folder's train.npz and test.npz: their class names', else the labels they use."""
    from edge_ft.data.npz import load_labelled_npz

    (_, y, names), (_, y_test, test_names) = (load_labelled_npz(folder / f) for f in ("train.npz", "test.npz"))
    if names is not None and test_names is not None and names != test_names:
        raise UserError(f"{folder}: train.npz and test.npz name different classes")
    named = names or test_names
    return len(named) if named else int(max(y.max(), y_test.max())) + 1


def ensure_bundle(root: Path, base: Path, base_sha: str, cfg: MethodConfig, engine: str) -> Path:
    """The `edge-ft export` bundle of cfg for engine on base, exported unless an identical one is there."""
    name = f"{engine}-{cfg.method}" + (f"-r{cfg.rank}-a{cfg.alpha:g}" if cfg.method == "lora" else "")
    folder = root / "prep" / "bundles" / f"{base_sha[:12]}-c{cfg.num_classes}" / name
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest["base"]["sha256"] == base_sha and manifest["method"] == cfg.to_dict():
            return folder
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from edge_ft.checkpoint import load_base
    from edge_ft.config import OptimizerConfig
    from edge_ft.host.export import export_bundle
    from edge_ft.training_defaults import DEFAULTS

    meta = load_base(base)[1]
    recipe = DEFAULTS[cfg.method]  # what `edge-ft export` uses when not told otherwise
    export_bundle(cfg, OptimizerConfig(recipe.optimizer, lr=recipe.lr), base, folder, engine=engine,
                  classes=meta.get("classes") if cfg.num_classes == meta["num_classes"] else None)
    return folder


def model_spec(model: str) -> str | None:
    """--model spec of a sweep's model name: None for LeNet-5, PKG.MODULE:CLASS for a reference model."""
    if model == LENET5:
        return None
    from edge_ft.host.models import REFERENCE_MODELS

    if model not in REFERENCE_MODELS:
        raise UserError(f"unknown model {model!r}: choose from {', '.join(MODEL_NAMES)}")
    cls = REFERENCE_MODELS[model]
    return f"{cls.__module__}:{cls.__name__}"


def ensure_model_base(root: Path, model: str, host) -> tuple[Path, str]:
    """(base weights, sha256) of a model sweep (`host`: the model's HostModel): the network's own initialisation
    drawn from seed 0, written once. Memory and step time do not depend on the weights' values, so no pretraining
    is needed for them."""
    import torch

    from edge_ft.checkpoint import base_sha256, load_base, meta_path, save_base

    base = root / "prep" / "models" / model / "base.safetensors"
    if not (base.is_file() and meta_path(base).is_file()):
        torch.manual_seed(0)
        state = {k: v.detach().numpy() for k, v in host.make().state_dict().items()}
        save_base(base, state, {"task": "none (initialisation, seed 0)", "seed": 0, "model": host.desc.title},
                  head=host.desc.output)
    load_base(base, head=_output_of(model), model=model)
    return base, base_sha256(base)


def ensure_model_bundle(root: Path, model: str, host, base: Path, base_sha: str, method: str, rank: int,
                        alpha: float, last_k: int) -> tuple[Path, dict]:
    """(bundle folder, its manifest) of `method` on `model` (`host`: its edge_ft.host.describe.HostModel) for the
    ort-step engine with AdamW, exported unless a bundle of the same base, method settings and optimizer is there
    (exports of the reference models take 20-260 s of CPU)."""
    from edge_ft.config import MethodConfig, OptimizerConfig
    from edge_ft.host.export import export_bundle
    from edge_ft.training_defaults import DEFAULTS

    cfg = MethodConfig(method, rank=rank, alpha=alpha, num_classes=host.desc.num_classes, last_k=last_k,
                       model=host.desc)
    opt = OptimizerConfig("adamw", lr=DEFAULTS[method].lr)
    name = "-".join([method, *([f"r{rank}-a{alpha:g}"] if method == "lora" else []),
                     *([f"k{last_k}"] if method == "last-k" else [])])
    folder = root / "prep" / "models" / model / "bundles" / f"{base_sha[:12]}-ort-step-{name}"
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if (manifest["base"]["sha256"] == base_sha and manifest["method"] == cfg.to_dict()
                and manifest["optimizer"] == opt.to_dict()):
            return folder, manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return folder, export_bundle(cfg, opt, base, folder, engine="ort-step", host=host)


def input_shape_of_model(model: str) -> tuple[int, ...] | None:
    from edge_ft.host.models import REFERENCE_MODELS

    return None if model == LENET5 else tuple(REFERENCE_MODELS[model].input_shape)


def _output_of(model: str) -> str:
    return "fc3" if model == LENET5 else "classifier"


def prepare_all(spec: dict) -> dict:
    """Everything a sweep needs, from a JSON-ready spec (see prepare_in_child); returns JSON-ready paths."""
    root = Path(spec["root"])
    if "models" in spec:
        return prepare_models(root, spec)
    from edge_ft.host.train import ensure_base

    base, sha = ensure_base(root, spec.get("base"), spec.get("pretrain_epochs"), spec.get("quiet", False))
    data = {task: ensure_data(root, task) for task in spec["tasks"]}
    bundles = []
    for label, method, engine, task in spec["bundles"]:
        cfg = MethodConfig(method, rank=spec["rank"], alpha=spec["alpha"], last_k=spec.get("last_k", 1),
                           num_classes=data[task][1])
        bundles.append([label, engine, task, str(ensure_bundle(root, base, sha, cfg, engine))])
    return {"base": str(base), "base_sha256": sha, "data": {t: [str(f), n] for t, (f, n) in data.items()},
            "bundles": bundles}


def prepare_models(root: Path, spec: dict) -> dict:
    """A model sweep's bases and bundles: {"bundles": [[model, method, folder, base sha256, manifest], ...]}."""
    from tqdm import tqdm

    from edge_ft.host.describe import host_model

    out, bases = [], {}
    pairs = [(m, method) for m in spec["models"] for method in spec["methods"]]
    for model, method in tqdm(pairs, desc="exporting step graphs", unit="bundle", disable=spec.get("quiet"),
                              file=sys.stderr):
        if model not in bases:  # tracing a model takes seconds: once per model
            host = host_model(model_spec(model), input_shape_of_model(model))
            bases[model] = (host, *ensure_model_base(root, model, host))
        host, base, sha = bases[model]
        folder, manifest = ensure_model_bundle(root, model, host, base, sha, method, spec["rank"], spec["alpha"],
                                               spec["last_k"])
        out.append([model, method, str(folder), sha, manifest])
    return {"bundles": out}


def prepare_in_child(spec: dict) -> dict:
    """prepare_all in a fresh interpreter (its output lines reach the user on stderr; the answer comes back as a
    file)."""
    from edge_ft.atomic import atomic_write_json

    folder = Path(spec["root"]) / "prep"
    spec_file, answer = folder / "spec.json", folder / "prepared.json"
    atomic_write_json(spec_file, spec)
    answer.unlink(missing_ok=True)
    # Its progress lines go to stderr (fd 2) with the sweep's own, so stdout holds only answers (recommend --json).
    from edge_ft.emulation.lifetime import run

    code = run([sys.executable, "-m", "edge_ft.bench.prepare", str(spec_file), str(answer)], "the preparation",
               stdout=2).returncode
    if code != 0 or not answer.is_file():
        raise UserError(f"preparing the sweep under {folder} failed (exit {code}; see the message above)")
    return json.loads(answer.read_text())


def main(argv: list[str]) -> int:
    from edge_ft.atomic import atomic_write_json

    spec_file, answer = argv
    try:
        atomic_write_json(answer, prepare_all(json.loads(Path(spec_file).read_text())))
    except UserError as e:
        print(f"edge-ft bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
