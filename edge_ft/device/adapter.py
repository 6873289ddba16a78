"""Adapters: only the trained tensors, in Hugging Face PEFT's on-disk layout, and what a device does with them.

  adapter_model.safetensors  keys `base_model.model.<layer>.lora_A.weight` (r,in), `...lora_B.weight` (out,r),
                             trained biases and modules_to_save layers (a new head) as
                             `base_model.model.<layer>.<weight|bias>`, the keys PEFT itself writes for them
  adapter_config.json        LoraConfig fields only, so PEFT reads it without warnings (probe/full: peft_type null;
                             bias/last-k: a zero rank-1 LoRA carries them, see peft_carrier)
  edge_ft_adapter.json       edge-ft's record, written last (the commit point): method and its config, base sha256,
                             num_classes, classes (names, or null), dtype, sha256 of the two PEFT files
PEFT's `PeftModel.from_pretrained(LeNet5(num_classes=N), ADAPTER_DIR)` (or the user's module, for a bundle exported
with --model) loads a LoRA, bias or last-k adapter as is. Adapters of
format 1 kept edge-ft's record in an "edge_ft" block inside adapter_config.json; they still load.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_ft.architecture import last_k_layers, param_shapes, trainable_names
from edge_ft.atomic import atomic_save_safetensors, atomic_write_json, ensure_dir, remove_stale_temps, replace_folder
from edge_ft.checkpoint import load_json_object, load_safetensors, sha256_file
from edge_ft.config import MethodConfig
from edge_ft.contracts import MANIFEST, RESULTS, TRAINED
from edge_ft.data.npz import check_class_names
from edge_ft.device.bundle import (
    APPLIED_ADAPTER,
    PENDING_ADAPTER,
    Bundle,
    file_entry,
    finish_adapter_apply,
    load_bundle,
)
from edge_ft.device.inference import base_weights, write_inference_model
from edge_ft.device.model_card import model_source, stamp_model
from edge_ft.errors import UserError
from edge_ft.model_desc import model_from_manifest
from edge_ft.run_record import read_results

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
# A sidecar rather than safetensors header metadata: it can hash both PEFT files (the config's r, alpha and
# targets shape what PEFT computes), holds typed JSON (a class-name list), and written last it commits the folder.
RECORD = "edge_ft_adapter.json"
RECORD_FORMAT, RECORD_VERSION = "edge-ft-adapter", 2
LEGACY_BLOCK = "edge_ft"  # format 1: the record inside adapter_config.json (PEFT warned about the unknown key)
PREFIX = "base_model.model."
DTYPES = {"float32": np.float32, "float16": np.float16}


def peft_key(name: str, carrier: str | None = None) -> str:
    """fc1.lora_A -> base_model.model.fc1.lora_A.weight; fc3.bias -> base_model.model.fc3.bias; a tensor of the
    carrier layer (which PEFT wraps) -> base_model.model.<carrier>.base_layer.<bias|weight>."""
    layer, kind = name.rsplit(".", 1)
    if kind.startswith("lora_"):
        return f"{PREFIX}{name}.weight"
    return f"{PREFIX}{layer}.base_layer.{kind}" if layer == carrier else PREFIX + name


def edge_name(key: str) -> str:
    """Inverse of peft_key."""
    name = key.removeprefix(PREFIX).replace(".base_layer.", ".")
    return name.removesuffix(".weight") if ".lora_" in name else name


def peft_carrier(cfg: MethodConfig) -> str | None:
    """bias and last-k: PEFT loads only adapters of a PEFT type, and has none for bare biases or whole layers, so a
    rank-1 LoRA of zeros (B = A = 0: it adds exactly nothing) on the smallest linear or plain conv layer whose weight
    stays frozen carries them as LoRA's bias="all" / modules_to_save. None when there is no such layer (last-k over
    every layer: peft_type null, as for full)."""
    if cfg.method not in ("bias", "last-k"):
        return None
    net, trained = cfg.network, set(trainable_names(cfg))
    saved = set(peft_modules_to_save(cfg))
    free = [layer.name for layer in net.layers if layer.kind in ("linear", "conv2d")
            and layer.attrs.get("groups", 1) == 1 and layer.name not in saved and f"{layer.name}.weight" not in trained]
    sizes = {name: sum(t.size for t in carrier_tensors(cfg, name).values()) for name in free}
    return min(free, key=sizes.__getitem__) if free else None


def peft_modules_to_save(cfg: MethodConfig) -> list[str]:
    """The layers PEFT copies and trains whole: LoRA's and bias's modules_to_save, last-k's layers."""
    return last_k_layers(cfg) if cfg.method == "last-k" else list(cfg.modules_to_save)


def carrier_tensors(cfg: MethodConfig, carrier: str) -> dict[str, np.ndarray]:
    """The zero rank-1 pair in PEFT's shapes: (1,in), (out,1) for linear; (1,in,kh,kw), (out,1,1,1) for conv."""
    layer = cfg.network.layer(carrier)
    fan_in, fan_out = cfg.network.dims(carrier)
    kernel = tuple(layer.attrs["kernel_size"]) if layer.kind == "conv2d" else ()
    ones = (1, 1) if kernel else ()
    return {f"{carrier}.lora_A": np.zeros((1, fan_in, *kernel), np.float32),
            f"{carrier}.lora_B": np.zeros((fan_out, 1, *ones), np.float32)}


@dataclass(frozen=True)
class Adapter:
    folder: Path  # the adapter folder
    tensors: dict[str, np.ndarray]  # edge-ft names (fc1.lora_A, fc3.weight, ...) -> stored arrays
    peft: dict[str, Any]  # adapter_config.json as read: what PEFT applies
    record: dict[str, Any]  # edge-ft's record: method, base_sha256, num_classes, dtype, files {name: sha256}
    record_file: str  # where the record came from: RECORD, or CONFIG for a format-1 adapter


def holds_adapter(folder: Path) -> bool:
    return any((folder / name).exists() for name in (WEIGHTS, CONFIG, RECORD))


def export_adapter(run: str | Path, out: str | Path, dtype: str = "float32", force: bool = False) -> dict[str, Any]:
    """RUN (from `edge-ft train`) -> ADAPTER_DIR with the trained tensors, PEFT's config and edge-ft's record.

    An adapter already in `out` is replaced only with `force`. Returns the record.
    """
    run, out = Path(run), Path(out)
    if dtype not in DTYPES:
        raise UserError(f"unknown adapter dtype {dtype!r}: choose float32 or float16")
    if holds_adapter(out) and not force:
        raise UserError(f"{out}: already holds an adapter; pass --force to replace it, or choose another --out")
    results_path = run / RESULTS
    if not results_path.is_file() or not (run / TRAINED).is_file():
        raise UserError(f"{run}: not a finished run (no results.json / trained.safetensors); run `edge-ft train`")
    try:
        results = read_results(run)
        info = results["bundle"]
        cfg = MethodConfig.from_dict(info["method"], model=model_from_manifest(info, f"{results_path}: bundle.model"))
        classes = results.get("classes")
        if classes is not None:
            classes = check_class_names(classes, str(results_path), cfg.num_classes)
        if not isinstance(info["base"], dict) or not isinstance(info["base"]["sha256"], str):
            raise TypeError("bundle.base must record the base's sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, OSError) as e:
        raise UserError(f"{results_path}: unreadable run record ({e!r}); re-run `edge-ft train`") from None
    trained = load_safetensors(run / TRAINED)
    expected = {n: param_shapes(cfg)[n] for n in trainable_names(cfg)}
    if {n: tuple(v.shape) for n, v in trained.items()} != expected:
        raise UserError(f"{run / 'trained.safetensors'}: its tensors are not what a {cfg.method} run trains "
                        f"(results.json); the run folder mixes two runs, re-run `edge-ft train`")
    return write_adapter(out, trained, cfg, info["base"], classes, dtype)


def write_adapter(out: Path, trained: dict[str, np.ndarray], cfg: MethodConfig, base: dict[str, Any],
                  classes: list[str] | None, dtype: str = "float32") -> dict[str, Any]:
    """The three adapter files for `trained` (edge-ft names) of a `cfg` model on `base` ({"sha256", "file"});
    the caller checked the tensors. Returns the record."""
    (out / RECORD).unlink(missing_ok=True)  # uncommitted until the new record is written
    carrier = peft_carrier(cfg)
    if carrier:
        trained = {**trained, **carrier_tensors(cfg, carrier)}
    tensors = {peft_key(n, carrier): np.ascontiguousarray(v.astype(DTYPES[dtype])) for n, v in trained.items()}
    atomic_save_safetensors(out / WEIGHTS, tensors, metadata={"format": "pt"})  # PEFT/transformers read "pt"
    atomic_write_json(out / CONFIG, peft_config(cfg, base))
    record = {"format": RECORD_FORMAT, "format_version": RECORD_VERSION, "method": cfg.method,
              "method_config": cfg.to_dict(), "base_sha256": base["sha256"],
              "base_file": base.get("file"), "num_classes": cfg.num_classes, "classes": classes,
              "dtype": dtype, **({"peft_carrier": carrier} if carrier else {}),
              "files": {name: sha256_file(out / name) for name in (WEIGHTS, CONFIG)}}
    atomic_write_json(out / RECORD, record)
    return record


def peft_config(cfg: MethodConfig, base: dict[str, Any]) -> dict[str, Any]:
    """adapter_config.json: LoraConfig's own fields only (probe and full have no PEFT type; bias and last-k ride on
    a zero LoRA carrier, see peft_carrier)."""
    common = {"base_model_name_or_path": base.get("file"), "task_type": None}
    carrier = peft_carrier(cfg)
    if cfg.method != "lora" and not carrier:
        return {"peft_type": None, **common}
    r, alpha, targets, bias = ((cfg.rank, cfg.alpha, list(cfg.targets or ()), cfg.bias) if cfg.method == "lora" else
                               (1, 1.0, [carrier], "all" if cfg.method == "bias" else "none"))
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets,
            "bias": bias, "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": peft_modules_to_save(cfg) or None, **common}


def load_adapter(folder: str | Path) -> Adapter:
    """Read an adapter folder (either format); a missing or malformed file is a one-line UserError."""
    folder = Path(folder)
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing; {folder} is not an adapter folder (`edge-ft adapter export`)")
    config = load_json_object(config_path, "an adapter config", "re-export the adapter")
    if (folder / RECORD).is_file():
        record_file, record = RECORD, load_json_object(folder / RECORD, "an adapter record", "re-export the adapter")
        if (record.get("format"), record.get("format_version")) != (RECORD_FORMAT, RECORD_VERSION):
            raise UserError(f"{folder / RECORD}: adapter format {record.get('format_version')!r}, this edge-ft reads "
                            f"{RECORD_VERSION}; export the adapter with this edge-ft version")
        files_ok = isinstance(record.get("files"), dict) and all(
            isinstance(record["files"].get(n), str) for n in (WEIGHTS, CONFIG))
    elif isinstance(config.get(LEGACY_BLOCK), dict):  # format 1
        record_file, record = CONFIG, dict(config[LEGACY_BLOCK])
        record["files"] = {WEIGHTS: record.get("weights_sha256")}
        files_ok = record["files"][WEIGHTS] is None or isinstance(record["files"][WEIGHTS], str)
    else:
        raise UserError(f"{folder / RECORD}: missing; {folder} is not a finished edge-ft adapter (an interrupted "
                        "export?); export it again with `edge-ft adapter export --force`")
    if not isinstance(record.get("method"), str) or not files_ok:
        raise UserError(f"{folder / record_file}: not an edge-ft adapter record (method, files); "
                        "re-export the adapter")
    if record.get("classes") is not None:
        if not isinstance(record["classes"], list):
            raise UserError(f"{folder / record_file}: 'classes' must be a list of names; re-export the adapter")
        record["classes"] = check_class_names(record["classes"], str(folder / record_file))
    tensors = load_safetensors(folder / WEIGHTS)
    if not all(k.startswith(PREFIX) for k in tensors):
        raise UserError(f"{folder / WEIGHTS}: keys must start with {PREFIX!r} (PEFT layout)")
    tensors = {edge_name(k): v for k, v in tensors.items()}
    carrier = record.get("peft_carrier")
    if carrier is not None:  # bias / last-k: drop the zero LoRA that only carries them into PEFT
        lora = [tensors.pop(f"{carrier}.lora_{ab}", None) for ab in "AB"] if isinstance(carrier, str) else [None]
        if any(t is None or np.any(t) for t in lora):
            raise UserError(f"{folder / WEIGHTS}: the LoRA carrier of a {record['method']} adapter must be two zero "
                            "tensors; re-export the adapter")
    return Adapter(folder, tensors, config, record, record_file)


def _layers(value: object) -> list[str] | None:
    """A PEFT module list as sorted names; None when it is not a list of strings (null counts as empty)."""
    value = [] if value is None else value
    return sorted(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def shipped_frozen(bundle: Bundle) -> list[str]:
    """Frozen tensors an adapter still carries: under FFA-LoRA lora_A does not train, but PEFT needs it."""
    return [n for n in bundle.frozen if n.endswith(".lora_A")] if bundle.method.freeze_lora_a else []


def check_adapter(bundle: Bundle, adapter: Adapter) -> None:
    """Refuse an adapter made for another base, method, rank, layer set, class count, dtype or shape."""
    record, config, tensors, cfg = adapter.record, adapter.peft, adapter.tensors, bundle.method

    def refuse(what: str) -> None:
        raise UserError(f"{adapter.folder}: {what}; it does not fit bundle {bundle.path}")

    if record.get("base_sha256") != bundle.base_sha256:
        refuse("adapter was trained on a different base model (sha256 differs)")
    if record.get("method") != cfg.method:
        refuse(f"adapter is for method {record.get('method')}, the bundle trains {cfg.method}")
    if record.get("num_classes") != bundle.num_classes:
        refuse(f"adapter has {record.get('num_classes')} classes, the bundle {bundle.num_classes}")
    if record.get("classes") and bundle.classes and record["classes"] != bundle.classes:
        refuse(f"adapter's classes are {', '.join(record['classes'])}, the bundle's {', '.join(bundle.classes)}")
    if cfg.method == "lora":  # what PEFT will apply must be what the bundle trains
        if config.get("r") != cfg.rank:
            refuse(f"adapter rank r={config.get('r')}, the bundle's LoRA rank is {cfg.rank}")
        if _layers(config.get("target_modules")) != sorted(cfg.targets or ()):
            refuse(f"adapter targets {config.get('target_modules')}, the bundle's are {list(cfg.targets or ())}")
        if _layers(config.get("modules_to_save")) != sorted(cfg.modules_to_save):
            refuse(f"adapter modules_to_save {config.get('modules_to_save')}, "
                   f"the bundle's are {list(cfg.modules_to_save)}")
        if config.get("lora_alpha") != cfg.alpha or config.get("bias") != cfg.bias:
            refuse(f"adapter lora_alpha/bias {config.get('lora_alpha')}/{config.get('bias')}, "
                   f"the bundle's are {cfg.alpha}/{cfg.bias}")
    if (cfg.method in ("bias", "last-k") and config.get("peft_type") is not None
            and _layers(config.get("modules_to_save")) != sorted(peft_modules_to_save(cfg))):
        refuse(f"adapter modules_to_save {config.get('modules_to_save')}, the bundle trains "
               f"{peft_modules_to_save(cfg)} whole")
    dtype = record.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        refuse(f"adapter dtype {dtype!r} is not float32 or float16")
    wanted = set(bundle.trainable) | set(shipped_frozen(bundle))
    if set(tensors) != wanted:
        missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
        refuse(f"tensor {(missing or extra)[0]!r} is {'missing' if missing else 'not trainable in this method'}")
    for name, value in tensors.items():
        if value.dtype != DTYPES[str(dtype)]:
            refuse(f"{name} is {value.dtype}, the config says {dtype}")
        shape = bundle.trainable.get(name) or bundle.frozen[name]
        if tuple(value.shape) != shape:
            refuse(f"{name} has shape {tuple(value.shape)}, the bundle needs {shape}")
        if not np.all(np.isfinite(value)):
            refuse(f"{name} contains NaN or Inf")
    # Last, as the most general refusal: files that fit but are not the ones the record was written for.
    for name, expected in record["files"].items():
        if expected is not None and sha256_file(adapter.folder / name) != expected:
            raise UserError(f"{adapter.folder / name}: does not match {adapter.record_file} (an interrupted or "
                            "mixed copy); export or copy the adapter again")


def apply_adapter(bundle: Bundle, folder: str | Path) -> Path:
    """Store the adapter's tensors (float32) in the bundle, in place: training and inference then start from them.

    Crash-safe: the tensors go to a .pending file, manifest.json (the commit point) then names their hash, and
    only then the pending file is renamed into place; load_bundle finishes or drops an interrupted apply.
    """
    adapter = load_adapter(folder)
    check_adapter(bundle, adapter)
    if shipped_frozen(bundle):
        raise UserError(f"{bundle.path}: keeps lora_A fixed (FFA-LoRA), so an adapter's A cannot be applied to it; "
                        "merge the adapter (`edge-ft adapter merge`) or apply it to a plain LoRA bundle")
    remove_stale_temps(bundle.path)  # of an apply that was killed mid-write
    pending = bundle.file(PENDING_ADAPTER)
    atomic_save_safetensors(pending, {k: v.astype(np.float32) for k, v in adapter.tensors.items()},
                            metadata={"format": "edge-ft-applied-adapter"})
    manifest = dict(bundle.manifest)
    manifest["applied_adapter"] = {"file": APPLIED_ADAPTER, "source": str(Path(folder).resolve()),
                                   "adapter_sha256": sha256_file(Path(folder) / WEIGHTS)}
    manifest["files"] = {**manifest["files"], APPLIED_ADAPTER: file_entry(pending)}
    atomic_write_json(bundle.file(MANIFEST), manifest)
    finish_adapter_apply(bundle.path, manifest)
    return bundle.file(APPLIED_ADAPTER)


def merged_weights(bundle: Bundle, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The plain network's weights with the adapter folded in: W = W0 + (B @ A) * alpha / r for LoRA targets."""
    weights = base_weights(bundle)
    cfg = bundle.method
    for name, value in tensors.items():
        value = value.astype(np.float32)
        if name.endswith(".lora_A"):
            layer = name.split(".")[0]
            delta = tensors[f"{layer}.lora_B"].astype(np.float32) @ value  # (out,r) @ (r,in) -> (out,in)
            weights[f"{layer}.weight"] = weights[f"{layer}.weight"] + delta * np.float32(cfg.scaling)
        elif not name.endswith(".lora_B"):
            weights[name] = value  # a trained bias, a saved module or probed head, any tensor of full
    return weights


def merge_adapter(bundle: Bundle, folder: str | Path, out: str | Path) -> None:
    """A single forward-only ONNX model with the adapter merged into the weights (no LoRA ops left)."""
    adapter = load_adapter(folder)
    check_adapter(bundle, adapter)
    write_inference_model(bundle, merged_weights(bundle, adapter.tensors), out)
    classes = adapter.record.get("classes") or bundle.classes
    source = model_source(bundle, made_by="edge-ft adapter merge", adapter_sha256=adapter.record["files"][WEIGHTS])
    stamp_model(out, classes, source, bundle.input_shape)


def apply_adapter_to_copy(bundle: Bundle, folder: str | Path, out: str | Path) -> Path:
    """apply_adapter into a new bundle folder `out`, leaving `bundle` as it is; `out` appears whole or not at all."""
    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out}: exists; choose a new folder for the copy (or apply in place without --out)")
    check_adapter(bundle, load_adapter(folder))  # refuse before copying anything
    ensure_dir(out.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(bundle.path, staging, dirs_exist_ok=True)
        staging.chmod(0o755)  # mkdtemp creates 0700
        apply_adapter(load_bundle(staging), folder)
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
