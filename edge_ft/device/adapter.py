"""Adapters: only the trained tensors, in Hugging Face PEFT's on-disk layout, and what a device does with them.

  adapter_model.safetensors  keys `base_model.model.<layer>.lora_A.weight` (r,in), `...lora_B.weight` (out,r),
                             trained biases / a probed head as `base_model.model.<layer>.<weight|bias>`
  adapter_config.json        LoraConfig fields (LoRA) plus an "edge_ft" block: method, base sha256, classes, dtype
PEFT's `PeftModel.from_pretrained(LeNet5(...), ADAPTER_DIR)` loads a LoRA adapter as is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_ft.architecture import param_shapes, trainable_names
from edge_ft.atomic import atomic_save_safetensors, atomic_write_json, remove_stale_temps
from edge_ft.checkpoint import load_safetensors, sha256_file
from edge_ft.config import MethodConfig
from edge_ft.device.bundle import APPLIED_ADAPTER, MANIFEST, PENDING_ADAPTER, Bundle, file_entry, finish_adapter_apply
from edge_ft.device.inference import base_weights, write_inference_model
from edge_ft.errors import UserError

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."
DTYPES = {"float32": np.float32, "float16": np.float16}


def peft_key(name: str) -> str:
    """fc1.lora_A -> base_model.model.fc1.lora_A.weight; fc3.bias -> base_model.model.fc3.bias."""
    layer, kind = name.split(".")
    return f"{PREFIX}{name}.weight" if kind.startswith("lora_") else PREFIX + name


def edge_name(key: str) -> str:
    """Inverse of peft_key."""
    name = key.removeprefix(PREFIX)
    return name.removesuffix(".weight") if ".lora_" in name else name


def export_adapter(run: str | Path, out: str | Path, dtype: str = "float32") -> dict:
    """RUN (from `edge-ft train`) -> ADAPTER_DIR with the trained tensors and their config; returns the config."""
    run, out = Path(run), Path(out)
    if dtype not in DTYPES:
        raise UserError(f"unknown adapter dtype {dtype!r}: choose float32 or float16")
    results_path = run / "results.json"
    if not results_path.is_file() or not (run / "trained.safetensors").is_file():
        raise UserError(f"{run}: not a finished run (no results.json / trained.safetensors); run `edge-ft train`")
    try:
        info = json.loads(results_path.read_text())["bundle"]
        cfg = MethodConfig.from_dict(info["method"])
        if not isinstance(info["base"], dict) or not isinstance(info["base"]["sha256"], str):
            raise TypeError("bundle.base must record the base's sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, OSError) as e:
        raise UserError(f"{results_path}: unreadable run record ({e!r}); re-run `edge-ft train`") from None
    trained = load_safetensors(run / "trained.safetensors")
    expected = {n: param_shapes(cfg)[n] for n in trainable_names(cfg)}
    if {n: tuple(v.shape) for n, v in trained.items()} != expected:
        raise UserError(f"{run / 'trained.safetensors'}: its tensors are not what a {cfg.method} run trains "
                        f"(results.json); the run folder mixes two runs, re-run `edge-ft train`")
    tensors = {peft_key(n): np.ascontiguousarray(v.astype(DTYPES[dtype])) for n, v in trained.items()}
    atomic_save_safetensors(out / WEIGHTS, tensors, metadata={"format": "pt"})  # PEFT/transformers read "pt"
    config = adapter_config(cfg, info["base"], dtype)
    config["edge_ft"]["weights_sha256"] = sha256_file(out / WEIGHTS)  # the config, written last, commits them
    atomic_write_json(out / CONFIG, config)
    return config


def adapter_config(cfg: MethodConfig, base: dict, dtype: str) -> dict:
    extras = {"method": cfg.method, "base_sha256": base["sha256"], "num_classes": cfg.num_classes, "dtype": dtype,
              "format_version": 1}
    common = {"base_model_name_or_path": base.get("file"), "task_type": None, "edge_ft": extras}
    if cfg.method != "lora":
        return {"peft_type": None, **common}
    return {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "target_modules": list(cfg.targets),
            "bias": cfg.bias, "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, **common}


def load_adapter(folder: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors by edge-ft name, config); a missing or malformed file is a one-line UserError."""
    folder = Path(folder)
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing; {folder} is not an adapter folder (`edge-ft adapter export`)")
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config["edge_ft"], dict):
            raise TypeError("the edge_ft block must be a JSON object")
        config["edge_ft"]["method"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OSError) as e:
        raise UserError(f"{config_path}: not an edge-ft adapter config ({e!r}); re-export the adapter") from None
    tensors = load_safetensors(folder / WEIGHTS)
    if not all(k.startswith(PREFIX) for k in tensors):
        raise UserError(f"{folder / WEIGHTS}: keys must start with {PREFIX!r} (PEFT layout)")
    return {edge_name(k): v for k, v in tensors.items()}, config


def check_adapter(bundle: Bundle, tensors: dict[str, np.ndarray], config: dict, source: str | Path) -> None:
    """Refuse an adapter made for another base, method, rank, target set, class count, dtype or shape."""
    extras, cfg = config["edge_ft"], bundle.method

    def refuse(what: str) -> None:
        raise UserError(f"{source}: {what}; it does not fit bundle {bundle.path}")

    if extras.get("base_sha256") != bundle.base_sha256:
        refuse("adapter was trained on a different base model (sha256 differs)")
    if extras.get("method") != cfg.method:
        refuse(f"adapter is for method {extras.get('method')}, the bundle trains {cfg.method}")
    if extras.get("num_classes") != bundle.num_classes:
        refuse(f"adapter has {extras.get('num_classes')} classes, the bundle {bundle.num_classes}")
    if cfg.method == "lora":
        if config.get("r") != cfg.rank:
            refuse(f"adapter rank r={config.get('r')}, the bundle's LoRA rank is {cfg.rank}")
        targets = config.get("target_modules")
        if not isinstance(targets, list) or sorted(map(str, targets)) != sorted(cfg.targets):
            refuse(f"adapter targets {config.get('target_modules')}, the bundle's are {list(cfg.targets)}")
        if config.get("lora_alpha") != cfg.alpha or config.get("bias") != cfg.bias:
            refuse(f"adapter lora_alpha/bias {config.get('lora_alpha')}/{config.get('bias')}, "
                   f"the bundle's are {cfg.alpha}/{cfg.bias}")
    dtype = extras.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        refuse(f"adapter dtype {dtype!r} is not float32 or float16")
    if set(tensors) != set(bundle.trainable):
        missing, extra = sorted(set(bundle.trainable) - set(tensors)), sorted(set(tensors) - set(bundle.trainable))
        refuse(f"tensor {(missing or extra)[0]!r} is {'missing' if missing else 'not trainable in this method'}")
    for name, value in tensors.items():
        if value.dtype != DTYPES[dtype]:
            refuse(f"{name} is {value.dtype}, the config says {dtype}")
        if tuple(value.shape) != bundle.trainable[name]:
            refuse(f"{name} has shape {tuple(value.shape)}, the bundle needs {bundle.trainable[name]}")
        if not np.all(np.isfinite(value)):
            refuse(f"{name} contains NaN or Inf")
    # Last, as the most general refusal: weights that fit but are not the ones the config was written for.
    expected, weights = extras.get("weights_sha256"), Path(source) / WEIGHTS
    if expected is not None and weights.is_file() and sha256_file(weights) != expected:
        raise UserError(f"{weights}: does not match adapter_config.json (an interrupted or mixed copy); "
                        "export or copy the adapter again")


def apply_adapter(bundle: Bundle, folder: str | Path) -> Path:
    """Store the adapter's tensors (float32) in the bundle: training and inference then start from them.

    Crash-safe: the tensors go to a .pending file, manifest.json (the commit point) then names their hash, and
    only then the pending file is renamed into place; load_bundle finishes or drops an interrupted apply.
    """
    tensors, config = load_adapter(folder)
    check_adapter(bundle, tensors, config, folder)
    remove_stale_temps(bundle.path)  # of an apply that was killed mid-write
    pending = bundle.file(PENDING_ADAPTER)
    atomic_save_safetensors(pending, {k: v.astype(np.float32) for k, v in tensors.items()},
                            metadata={"format": "edge-ft-applied-adapter"})
    manifest = dict(bundle.manifest)
    manifest["applied_adapter"] = {"file": APPLIED_ADAPTER, "source": str(Path(folder).resolve()),
                                   "adapter_sha256": sha256_file(Path(folder) / WEIGHTS)}
    manifest["files"] = {**manifest["files"], APPLIED_ADAPTER: file_entry(pending)}
    atomic_write_json(bundle.file(MANIFEST), manifest)
    finish_adapter_apply(bundle.path, manifest)
    return bundle.file(APPLIED_ADAPTER)


def merged_weights(bundle: Bundle, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Plain LeNet-5 weights with the adapter folded in: W = W0 + (B @ A) * alpha / r for LoRA targets."""
    weights = base_weights(bundle)
    cfg = bundle.method
    for name, value in tensors.items():
        value = value.astype(np.float32)
        if name.endswith(".lora_A"):
            layer = name.split(".")[0]
            delta = tensors[f"{layer}.lora_B"].astype(np.float32) @ value  # (out,r) @ (r,in) -> (out,in)
            weights[f"{layer}.weight"] = weights[f"{layer}.weight"] + delta * np.float32(cfg.scaling)
        elif not name.endswith(".lora_B"):
            weights[name] = value  # a trained bias, a probed head, or any tensor of full fine-tuning
    return weights


def merge_adapter(bundle: Bundle, folder: str | Path, out: str | Path) -> None:
    """A single forward-only ONNX model with the adapter merged into the weights (no LoRA ops left)."""
    tensors, config = load_adapter(folder)
    check_adapter(bundle, tensors, config, folder)
    write_inference_model(bundle, merged_weights(bundle, tensors), out)
