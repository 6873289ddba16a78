"""Ed25519 key pairs: PEM files, key ids, and rotation statements signed by the retiring key.

The private key stays on the machine that signs (it is never needed on a device); a device holds public keys only.
A key id is the sha256 (hex) of the 32 raw public-key bytes, so it names a key whatever file it came in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_ft.atomic import atomic_write_bytes, atomic_write_json
from edge_ft.errors import UserError

ROTATION_DOMAIN = "edge-ft-key-rotation-v1"


def _crypto() -> Any:
    """cryptography's Ed25519 and serialization modules, or one line saying how to install them."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise UserError("signing and verifying need the cryptography package: pip install cryptography "
                        "(the device extra installs it)") from None
    return ed25519, serialization, InvalidSignature


@dataclass(frozen=True)
class PublicKey:
    raw: bytes  # the 32 raw Ed25519 bytes
    source: str  # where it came from (a file, a rotation statement), for messages

    @property
    def keyid(self) -> str:
        return key_id(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        ed25519, _, invalid = _crypto()
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except invalid:
            return False
        return True


def key_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def short(keyid: str) -> str:
    """The first 16 hex digits: what messages show of a key id."""
    return keyid[:16]


def new_key_pair(out: str | Path) -> tuple[Path, Path, str]:
    """OUT.key (PKCS#8 PEM, mode 0600) and OUT.pub (SubjectPublicKeyInfo PEM); returns both paths and the key id.
    An existing OUT.key is never overwritten."""
    ed25519, serialization, _ = _crypto()
    out = Path(out)
    private_path, public_path = out.with_name(out.name + ".key"), out.with_name(out.name + ".pub")
    if private_path.exists() or public_path.exists():
        raise UserError(f"{private_path}: a key of that name exists; choose another --out (keys are never replaced)")
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = private.public_key()
    atomic_write_bytes(public_path, public.public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    old_umask = os.umask(0o077)
    try:
        atomic_write_bytes(private_path, pem)
    finally:
        os.umask(old_umask)
    os.chmod(private_path, 0o600)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private_path, public_path, key_id(raw)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what} file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def load_private_key(path: str | Path) -> Any:
    """An Ed25519 private key from a PEM file (`edge-ft keys new`)."""
    ed25519, serialization, _ = _crypto()
    path = Path(path)
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: not an unencrypted PEM private key ({e}); make one with `edge-ft keys new`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UserError(f"{path}: not an Ed25519 key; make one with `edge-ft keys new`")
    return key


def public_of(private: Any) -> PublicKey:
    _, serialization, _ = _crypto()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(raw, "the signing key")


def load_public_key(path: str | Path) -> PublicKey:
    """An Ed25519 public key from a PEM file (`edge-ft keys new` writes NAME.pub)."""
    ed25519, serialization, _ = _crypto()
    path = Path(path)
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: not a PEM public key ({e}); pass the .pub file of `edge-ft keys new`") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UserError(f"{path}: not an Ed25519 public key; pass the .pub file of `edge-ft keys new`")
    return PublicKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw), str(path))


def canonical(obj: object) -> bytes:
    """The one byte string a JSON value signs as: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def tagged(domain: str, body: dict[str, Any]) -> bytes:
    """What is signed: the domain tag, a newline, the canonical JSON. The tag keeps a signature made for one
    purpose (a folder manifest, a key rotation) from being valid as the other."""
    return domain.encode() + b"\n" + canonical(body)


def sign_body(private: Any, domain: str, body: dict[str, Any]) -> str:
    """The base64 Ed25519 signature of `body` under `domain` (see `tagged`)."""
    return b64(private.sign(tagged(domain, body)))


def verify_body(key: PublicKey, domain: str, body: dict[str, Any], signature: object, where: str) -> bool:
    """Whether `signature` (base64) is `key`'s signature of `body` under `domain`."""
    return key.verify(unb64(signature, where), tagged(domain, body))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object, where: str) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except (ValueError, TypeError):
        raise UserError(f"{where}: not base64; sign again") from None


def rotation_statement(old_private_path: str | Path, new_public_path: str | Path, out: str | Path) -> dict[str, Any]:
    """A statement, signed by the old key, that the new key takes over from it; written to `out` as JSON."""
    old = load_private_key(old_private_path)
    new = load_public_key(new_public_path)
    body = {"domain": ROTATION_DOMAIN, "old_keyid": public_of(old).keyid, "new_keyid": new.keyid,
            "new_public_key": b64(new.raw), "issued": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    statement = {"signed": body, "signature": b64(old.sign(tagged(ROTATION_DOMAIN, body)))}
    atomic_write_json(out, statement)
    return statement


def check_rotation(statement: object, where: str) -> tuple[str, PublicKey, bytes, dict[str, Any]]:
    """(old key id, new key, signature, signed body) of a well-formed rotation statement; the caller verifies the
    signature with the old key it trusts."""
    body = statement.get("signed") if isinstance(statement, dict) else None
    if not isinstance(body, dict) or body.get("domain") != ROTATION_DOMAIN or not all(
            isinstance(body.get(k), str) for k in ("old_keyid", "new_keyid", "new_public_key")):
        raise UserError(f"{where}: not an edge-ft key rotation statement; make one with `edge-ft keys rotate`")
    new = PublicKey(unb64(body["new_public_key"], where), f"a rotation from key {short(body['old_keyid'])}")
    if new.keyid != body["new_keyid"]:
        raise UserError(f"{where}: the new key does not match its key id; make the statement again")
    assert isinstance(statement, dict)  # checked with `body` above
    return body["old_keyid"], new, unb64(statement.get("signature"), where), body


def load_rotation(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        statement = json.loads(_read(path, "rotation statement"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not JSON; make the statement with `edge-ft keys rotate`") from None
    check_rotation(statement, str(path))
    return dict(statement)
