"""`edge-ft adapter export|apply|merge`: ship only the trained tensors, load them into a bundle, or merge them."""

from __future__ import annotations

from edge_ft.commands.argtypes import int_at_least, positive_float
from edge_ft.trust.policy import add_trust_option


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "adapter",
        help="export a run's trained tensors as a PEFT-style adapter, apply one to a bundle, or merge it (no torch)",
        description="Adapters hold only what training changed: LoRA A/B and a new head trained whole (PEFT "
        "layout, loadable with PeftModel.from_pretrained), a probed head, or trained biases.",
    )
    sub = p.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)

    e = sub.add_parser("export", help="RUN -> adapter folder (adapter_model.safetensors + adapter_config.json)",
                       description="Writes what the run trained, and nothing else, to ADAPTER_DIR: "
                       "adapter_model.safetensors, adapter_config.json (PEFT's layout for LoRA) and "
                       "edge_ft_adapter.json (the bundle, base and class names it belongs to).")
    e.add_argument("run", metavar="RUN", help="run folder from `edge-ft train`")
    e.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="adapter folder to write")
    e.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="stored precision (default float32; float16 halves the file)")
    e.add_argument("--force", action="store_true", help="replace an adapter already in ADAPTER_DIR")
    e.set_defaults(func=_export)

    a = sub.add_parser("apply", help="load an adapter into a bundle (in place, or into a copy with --out): "
                       "training and inference start from it",
                       description="Stores the adapter's tensors in BUNDLE itself (crash-safe; manifest.json is the "
                       "commit point), so the bundle no longer starts from the base weights. --out writes the result "
                       "to a new bundle folder instead and leaves BUNDLE as it is.")
    a.add_argument("bundle", metavar="BUNDLE", help="bundle folder from `edge-ft export` (the adapter's own)")
    a.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter folder from `edge-ft adapter export`")
    a.add_argument("--out", metavar="NEW_BUNDLE", help="write a copy of BUNDLE with the adapter applied here")
    add_trust_option(a)
    a.set_defaults(func=_apply)

    m = sub.add_parser("merge", help="fold an adapter into the weights: one plain forward-only ONNX model",
                       description="Adds the adapter's update to the bundle's base weights (LoRA: W + scale * B @ A) "
                       "and writes one forward-only model.onnx with its card (class names, input scaling) that "
                       "plain onnxruntime and `edge-ft predict` run; no adapter code at inference.")
    m.add_argument("bundle", metavar="BUNDLE", help="bundle folder from `edge-ft export` that the adapter was "
                   "trained on")
    m.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter folder from `edge-ft adapter export`")
    m.add_argument("--out", required=True, metavar="MODEL.onnx", help="merged model to write")
    add_trust_option(m)
    m.set_defaults(func=_merge)

    s = sub.add_parser("sign", help="sign every file of an adapter (or bundle, or model folder) with an Ed25519 key",
                       description="Writes edge_ft_signature.json: each file's sha256 and size, a name, a version "
                       "(raise it with every release: devices refuse older ones) and an expiry, signed with KEY.")
    s.add_argument("folder", metavar="ADAPTER_DIR", help="adapter folder (a bundle or a model folder works too)")
    s.add_argument("--key", required=True, metavar="KEY", help="private key of `edge-ft keys new` (NAME.key)")
    s.add_argument("--version", required=True, type=int_at_least(1), metavar="N",
                   help="release number, monotonic per name")
    s.add_argument("--name", metavar="NAME", help="what versions count for (default: the folder's name)")
    s.add_argument("--expires-in", type=positive_float, default=90.0, metavar="DAYS",
                   help="days until devices refuse it as stale")
    s.add_argument("--rotation", action="append", default=[], metavar="ROTATION.json",
                   help="statement of `edge-ft keys rotate` linking KEY to a key devices trust (repeatable)")
    s.set_defaults(func=_sign)

    v = sub.add_parser("verify", help="check a signed folder: trusted signer, every file, expiry, version",
                       description="Check a signed folder: trusted signer, every file, expiry, version.")
    v.add_argument("folder", metavar="ADAPTER_DIR", help="signed adapter folder (a bundle or a model folder works too)")
    add_trust_option(v)
    v.set_defaults(func=_verify)


def _export(args) -> int:
    from pathlib import Path

    from edge_ft.device.adapter import WEIGHTS, export_adapter
    from edge_ft.validate import writable_folder

    writable_folder(args.out)
    record = export_adapter(args.run, args.out, args.dtype, force=args.force)
    size = (Path(args.out) / WEIGHTS).stat().st_size
    print(f"{args.out}: {record['method']} adapter, {args.dtype}, {WEIGHTS} {size:,} bytes")
    return 0


def _apply(args) -> int:
    from edge_ft.device.adapter import apply_adapter, apply_adapter_to_copy
    from edge_ft.device.bundle import load_bundle
    from edge_ft.trust.policy import enforce

    enforce("adapter apply", [args.bundle, args.adapter], args.trust)
    bundle = load_bundle(args.bundle)
    if args.out:
        from edge_ft.validate import writable_folder

        writable_folder(args.out)
        apply_adapter_to_copy(bundle, args.adapter, args.out)
        print(f"{args.out}: copy of {args.bundle} with the adapter applied; `edge-ft train` and inference start "
              f"from it ({args.bundle} unchanged)")
        return 0
    target = apply_adapter(bundle, args.adapter)
    print(f"{args.bundle}: bundle changed in place, adapter applied ({target.name}); `edge-ft train` and "
          "inference now start from it")
    return 0


def _merge(args) -> int:
    from edge_ft.device.adapter import merge_adapter
    from edge_ft.device.bundle import load_bundle
    from edge_ft.trust.policy import enforce
    from edge_ft.validate import writable_file

    writable_file(args.out)
    enforce("adapter merge", [args.bundle, args.adapter], args.trust)
    merge_adapter(load_bundle(args.bundle), args.adapter, args.out)
    print(f"{args.out}: merged forward-only model")
    return 0


def _sign(args) -> int:
    from datetime import timedelta

    from edge_ft.trust.signature import SIGNATURE, now_utc, sign_folder

    body = sign_folder(args.folder, args.key, args.version, args.name,
                       now_utc() + timedelta(days=args.expires_in), args.rotation)
    print(f"{args.folder}/{SIGNATURE}: {body['kind']} {body['name']} version {body['version']}, "
          f"{len(body['files'])} files, key {body['keyid'][:16]}, expires {body['expires']}")
    return 0


def _verify(args) -> int:
    from edge_ft.errors import UserError
    from edge_ft.trust.policy import check, load_policy

    policy = load_policy(args.trust)
    if policy is None:
        raise UserError("no key to verify against: pass --trust PUBKEY or install one with `edge-ft keys trust`")
    v = check(policy, args.folder, remember=False)
    via = f" (via rotation from key {v.rotations[0][0][:16]})" if v.rotations else ""
    print(f"{args.folder}: {v.kind} {v.name} version {v.version}, signed by key {v.keyid[:16]}{via}, "
          f"every file verified, expires {v.expires:%Y-%m-%d}")
    return 0
