"""A device's trust policy: the keys it trusts, the highest version it accepted per name, and the check that
`train`, `adapter apply|merge`, `predict` and `deploy` run before touching an artifact.

A policy exists when keys are given (--trust PUB, repeatable) or installed (`edge-ft keys trust PUB` copies them
to $EDGE_FT_HOME/trusted-keys/, default ~/.edge-ft). Without one, commands behave as before and print one notice
line that what they use is unverified. With one, anything unsigned, signed by another key, altered, expired or
older than a version already accepted (TUF's rollback and freeze attacks) is refused in one line (exit 2).

The state file ($EDGE_FT_HOME/trust-state.json, written atomically) remembers per name the highest version and the
digest of what was signed (the same version must not come back with other content), and keys retired by a rotation:
once a device has seen key B take over from key A, A alone no longer signs for it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edge_ft.atomic import atomic_write_json, ensure_dir
from edge_ft.errors import UserError
from edge_ft.trust.keys import PublicKey, load_public_key, short
from edge_ft.trust.signature import TIME_FORMAT, Verified, now_utc, verify_folder

HOME_ENV = "EDGE_FT_HOME"
TRUSTED_DIR, STATE_FILE = "trusted-keys", "trust-state.json"


def home() -> Path:
    return Path(os.environ.get(HOME_ENV) or "~/.edge-ft").expanduser()


@dataclass(frozen=True)
class Policy:
    keys: dict[str, PublicKey]  # key id -> key
    state_path: Path

    def names(self) -> str:
        return ", ".join(short(k) for k in self.keys)


def installed_keys() -> list[Path]:
    folder = home() / TRUSTED_DIR
    return sorted(folder.glob("*.pub")) if folder.is_dir() else []


def load_policy(trust: list[str] | None = None) -> Policy | None:
    """The keys from --trust and from $EDGE_FT_HOME/trusted-keys; None when there are none (no policy)."""
    keys: dict[str, PublicKey] = {}
    for path in [*map(Path, trust or []), *installed_keys()]:
        key = load_public_key(path)
        keys.setdefault(key.keyid, key)
    return Policy(keys, home() / STATE_FILE) if keys else None


def trust_key(public: str | Path) -> tuple[Path, str]:
    """Install a public key on this device: $EDGE_FT_HOME/trusted-keys/<key id prefix>.pub."""
    key = load_public_key(public)
    folder = ensure_dir(home() / TRUSTED_DIR)
    target = folder / f"{short(key.keyid)}.pub"
    if not target.exists():
        tmp = folder / f".{target.name}.tmp"
        shutil.copyfile(public, tmp)
        os.replace(tmp, target)
    return target, key.keyid


def read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"accepted": {}, "retired": {}}
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: unreadable trust state ({e}); restore it from a backup (deleting it forgets "
                        "which versions were accepted)") from None
    if not isinstance(state, dict) or not isinstance(state.get("accepted"), dict):
        raise UserError(f"{path}: not an edge-ft trust state; restore it from a backup")
    state.setdefault("retired", {})
    return state


def check_fresh(v: Verified, state: dict[str, Any]) -> None:
    """Refuse a retired key, an older version than one accepted, or an accepted version with other content."""
    retired = state["retired"]
    if v.keyid in retired:
        raise UserError(f"{v.folder}: signed by key {short(v.keyid)}, retired on this device in favour of key "
                        f"{short(retired[v.keyid])}; ask for an artifact signed by the new key")
    seen = state["accepted"].get(v.name)
    if not isinstance(seen, dict):
        return
    if v.version < seen.get("version", 0):
        raise UserError(f"{v.folder}: {v.name} version {v.version} (key {short(v.keyid)}) is older than version "
                        f"{seen['version']} already accepted; refusing a rollback")
    if v.version == seen.get("version") and v.digest != seen.get("digest"):
        raise UserError(f"{v.folder}: {v.name} version {v.version} (key {short(v.keyid)}) differs from the "
                        f"version {v.version} accepted before; a new release needs a higher version")


def record(v: Verified, state: dict[str, Any], path: Path) -> None:
    """Remember `v` as accepted (its version becomes the floor) and the keys its rotations retired."""
    seen = state["accepted"].get(v.name)
    if not isinstance(seen, dict) or v.version > seen.get("version", 0):
        state["accepted"][v.name] = {"version": v.version, "digest": v.digest, "keyid": v.keyid,
                                     "accepted": now_utc().strftime(TIME_FORMAT)}
    for old, new in v.rotations:
        state["retired"][old] = new
    atomic_write_json(path, state)


def check(policy: Policy, folder: str | Path, remember: bool = True, now: datetime | None = None) -> Verified:
    """Verify `folder` under `policy` and (with `remember`) record it as accepted."""
    v = verify_folder(folder, policy.keys, now)
    state = read_state(policy.state_path)
    check_fresh(v, state)
    if remember:
        record(v, state, policy.state_path)
    return v


def enforce(command: str, folders: list[str | Path], trust: list[str] | None = None) -> list[Verified] | None:
    """What a device command runs first: under a policy every folder must pass `check` (else one line, exit 2);
    without one, None and a notice line on stderr once the command succeeded."""
    policy = load_policy(trust)
    if policy is None:
        notice_unverified(command, folders)
        return None
    return [check(policy, f) for f in folders]


def trusted_model(path: str | Path, trust: list[str] | None) -> Path:
    """What `predict` opens: a deploy folder's active model (deploy verified what it merged), or MODEL_OR_RUN,
    whose folder must be signed by a trusted key under a policy."""
    from edge_ft.trust.rollout import ACTIVE, active_model, read_slot

    path = Path(path)
    policy = load_policy(trust)
    if path.is_dir() and (path / ACTIVE).is_file():
        model = active_model(path)
        if policy is not None:
            slot = read_slot(model.parent)
            if not isinstance(slot.get("signed"), dict) or not {"adapter", "bundle"} <= set(slot["signed"]):
                raise UserError(f"{model.parent}: deployed without verification (no trust policy then); deploy "
                                "a signed adapter and bundle again under the policy")
        return model
    if policy is None:
        notice_unverified("predict", [path])
    else:
        check(policy, path if path.is_dir() else path.parent)
    return path


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust", action="append", metavar="PUBKEY",
                        help="accept only artifacts signed by this public key (repeatable); keys installed with "
                        "`edge-ft keys trust` apply too")


_NOTICES: list[str] = []


def notice_unverified(command: str, folders: list[str | Path]) -> None:
    """Queue the no-policy notice; the CLI prints it once the command has succeeded, so a refusal stays one line."""
    _NOTICES.append(f"edge-ft {command}: notice: no trust policy (--trust or `edge-ft keys trust`); "
                    f"{', '.join(map(str, folders))} not verified")


def flush_notices() -> None:
    while _NOTICES:
        print(_NOTICES.pop(0), file=sys.stderr)


def clear_notices() -> None:
    _NOTICES.clear()
