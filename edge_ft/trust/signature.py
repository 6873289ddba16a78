r"""The signed manifest of a folder: every file's sha256 and size, a name, a version and an expiry, signed with
Ed25519 and stored beside the files as edge_ft_signature.json.

  {"signed": {"domain": "edge-ft-signature-v1", "kind": "adapter", "name": "digits", "version": 3,
              "created": "...Z", "expires": "...Z", "keyid": "<sha256 of the raw public key>",
              "files": [{"path": "adapter_config.json", "sha256": "...", "size": 412}, ...]},
   "signature": "<base64 Ed25519 over 'edge-ft-signature-v1\n' + canonical JSON of signed>",
   "rotations": [<statements by which the signing key took over from a key the device trusts>]}

A bundle's manifest.json is the one file a device rewrites (`edge-ft adapter apply` adds the applied adapter to
it), so for a bundle it is hashed with those two entries taken out, and the applied-adapter files may be present
unlisted: the graphs and weights the device trains are still exactly the signed ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edge_ft.atomic import TEMP_SUFFIX, atomic_write_json
from edge_ft.checkpoint import sha256_file
from edge_ft.errors import UserError
from edge_ft.trust.keys import (
    PublicKey,
    b64,
    check_rotation,
    load_private_key,
    load_rotation,
    public_of,
    short,
    tagged,
    unb64,
)

SIGNATURE = "edge_ft_signature.json"
DOMAIN = "edge-ft-signature-v1"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
BUNDLE_MANIFEST = "manifest.json"
DEVICE_WRITTEN = {"applied_adapter.safetensors", "applied_adapter.safetensors.pending"}  # see edge_ft.device.bundle
MANIFEST_DIGEST = "sha256-bundle-manifest"  # manifest.json without the applied adapter's entries


@dataclass(frozen=True)
class Verified:
    folder: Path
    kind: str  # adapter | bundle | model | folder
    name: str
    version: int
    keyid: str  # the key that signed
    expires: datetime
    digest: str  # sha256 of the signed bytes: the same version must always mean the same content
    rotations: list[tuple[str, str]] = field(default_factory=list)  # (old keyid, new keyid) this signature used


def folder_kind(folder: Path) -> str:
    if (folder / "edge_ft_adapter.json").is_file() or (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / BUNDLE_MANIFEST).is_file():
        return "bundle"
    return "model" if (folder / "model.onnx").is_file() else "folder"


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _covered(folder: Path) -> list[str]:
    """Every regular file below `folder` (POSIX paths, sorted), without the signature and atomic-write temps."""
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            raise UserError(f"{p}: a symbolic link; a signed folder holds regular files only")
        if p.is_file() and rel != SIGNATURE and not (p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)):
            files.append(rel)
    return files


def _bundle_manifest_digest(path: Path) -> str:
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: corrupt JSON ({e}); re-export the bundle") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise UserError(f"{path}: not an edge-ft bundle manifest; re-export the bundle")
    core = {k: v for k, v in manifest.items() if k != "applied_adapter"}
    core["files"] = {k: v for k, v in manifest.get("files", {}).items() if k not in DEVICE_WRITTEN}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _entry(folder: Path, rel: str, kind: str) -> dict[str, Any]:
    path = folder / rel
    if kind == "bundle" and path.name == BUNDLE_MANIFEST:
        return {"path": rel, "digest": MANIFEST_DIGEST, "sha256": _bundle_manifest_digest(path)}
    return {"path": rel, "sha256": sha256_file(path), "size": path.stat().st_size}


def sign_folder(folder: str | Path, key_path: str | Path, version: int, name: str | None = None,
                expires: datetime | None = None, rotations: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Write FOLDER/edge_ft_signature.json (atomically) over every file in FOLDER; returns the signed body."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder to sign")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"--version {version!r}: give a whole number from 1 up (raise it for every release)")
    kind = folder_kind(folder)
    if kind == "adapter" and not (folder / "edge_ft_adapter.json").is_file():
        raise UserError(f"{folder}: not a finished edge-ft adapter (no edge_ft_adapter.json); export it first")
    files = _covered(folder)
    if not files:
        raise UserError(f"{folder}: holds no files to sign")
    private = load_private_key(key_path)
    created = now_utc()
    expires = expires or created + timedelta(days=90)
    body = {"domain": DOMAIN, "kind": kind, "name": name or folder.resolve().name, "version": version,
            "created": created.strftime(TIME_FORMAT), "expires": expires.strftime(TIME_FORMAT),
            "keyid": public_of(private).keyid, "files": [_entry(folder, rel, kind) for rel in files]}
    statements = [load_rotation(p) for p in rotations]
    signed = {"signed": body, "signature": b64(private.sign(tagged(DOMAIN, body)))}
    atomic_write_json(folder / SIGNATURE, {**signed, **({"rotations": statements} if statements else {})})
    return body


def read_signature(folder: Path) -> dict[str, Any]:
    """The parsed signature file, checked for shape; an unsigned folder is its own one-line refusal."""
    path = folder / SIGNATURE
    if not path.is_file():
        raise UserError(f"{folder}: unsigned (no {SIGNATURE}); this device accepts only signed artifacts "
                        "(`edge-ft adapter sign FOLDER --key KEY`)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: not a readable signature ({e}); sign the folder again") from None
    body = doc.get("signed") if isinstance(doc, dict) else None
    ok = (isinstance(body, dict) and body.get("domain") == DOMAIN and isinstance(body.get("keyid"), str)
          and isinstance(body.get("name"), str) and isinstance(body.get("version"), int)
          and isinstance(body.get("files"), list) and all(isinstance(f, dict) and isinstance(f.get("path"), str)
                                                          for f in body["files"])
          and isinstance(doc.get("rotations", []), list))
    if not ok:
        raise UserError(f"{path}: not an {DOMAIN} signature (domain, keyid, name, version, files); sign again")
    return dict(doc)


def resolve_key(doc: dict[str, Any], trusted: dict[str, PublicKey],
                where: str) -> tuple[PublicKey, list[tuple[str, str]]]:
    """The trusted key that signed, directly or through rotation statements each signed by a key already
    trusted; otherwise the one-line refusal naming the signing key."""
    known, used = dict(trusted), []
    pending = list(doc.get("rotations", []))
    progress = True
    while pending and progress:
        progress = False
        for statement in list(pending):
            old_id, new, signature, body = check_rotation(statement, where)
            if old_id in known and known[old_id].verify(signature, tagged(body["domain"], body)):
                known.setdefault(new.keyid, new)
                used.append((old_id, new.keyid))
                pending.remove(statement)
                progress = True
    keyid = doc["signed"]["keyid"]
    if keyid not in known:
        names = ", ".join(short(k) for k in trusted) or "none"
        raise UserError(f"{where}: signed by key {short(keyid)}, which this device does not trust "
                        f"(trusted: {names})")
    return known[keyid], [u for u in used if u[1] in _chain(used, keyid)]


def _chain(used: list[tuple[str, str]], keyid: str) -> set[str]:
    """The key ids on the rotation path that ends at `keyid`."""
    back = {new: old for old, new in used}
    chain = {keyid}
    while keyid in back and back[keyid] not in chain:
        keyid = back[keyid]
        chain.add(keyid)
    return chain


def _parse_time(text: object, where: str) -> datetime:
    try:
        return datetime.strptime(str(text), TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        raise UserError(f"{where}: unreadable time {text!r}; sign again") from None


def check_files(folder: Path, body: dict[str, Any], signer: str) -> None:
    """Every listed file is there with its signed digest, and no file is there that the signature does not list."""
    kind = str(body.get("kind", ""))
    listed = {f["path"]: f for f in body["files"]}
    for rel, entry in listed.items():
        path = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise UserError(f"{folder / SIGNATURE}: lists {rel!r}, a path outside the folder; refusing it")
        if not path.is_file():
            raise UserError(f"{path}: listed in the signature of key {short(signer)} but missing")
        if _entry(folder, rel, kind) != entry:
            raise UserError(f"{path}: changed since key {short(signer)} signed it (sha256 differs); "
                            "copy the signed artifact again")
    for rel in _covered(folder):
        if rel not in listed and not (kind == "bundle" and Path(rel).name in DEVICE_WRITTEN):
            raise UserError(f"{folder / rel}: not covered by the signature of key {short(signer)}; "
                            "remove it or sign the folder again")


def verify_folder(folder: str | Path, trusted: dict[str, PublicKey], now: datetime | None = None) -> Verified:
    """Check FOLDER's signature against `trusted` (key id -> key): signer, signature, every file, expiry.
    Freshness against what the device accepted before is edge_ft.trust.policy's job."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    doc = read_signature(folder)
    where = str(folder / SIGNATURE)
    body = doc["signed"]
    key, rotations = resolve_key(doc, trusted, f"{folder}")
    data = tagged(DOMAIN, body)
    if not key.verify(unb64(doc.get("signature"), where), data):
        raise UserError(f"{where}: the signature of key {short(key.keyid)} does not verify; the signed manifest "
                        "was altered")
    check_files(folder, body, key.keyid)
    expires = _parse_time(body.get("expires"), where)
    if (now or now_utc()) > expires:
        raise UserError(f"{folder}: {body['name']} version {body['version']} (key {short(key.keyid)}) expired "
                        f"{body['expires']}; refusing a stale artifact, ask for a freshly signed one")
    return Verified(folder, str(body.get("kind")), body["name"], body["version"], key.keyid, expires,
                    hashlib.sha256(data).hexdigest(), rotations)
