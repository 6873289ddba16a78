"""Device profiles: what a target board offers an application (cores, memory budget, per-core speed).

Profiles are TOML files. The shipped ones live in edge_ft/emulation/device_profiles/, package data of the wheel
(pyproject.toml), read in place by an editable install: one source, nothing to keep in sync.
A profile is named by file stem (`rpi-3b`) or given by path (`./my-board.toml`); folders listed in
$EDGE_FT_PROFILES (os.pathsep-separated) are searched before the shipped ones, so a user's measured profile
overrides a shipped estimate of the same name.

Values "auto" (allowed for arch, cores, threads, ram_mb, budget_mb) are read from this machine at load time.
"""

from __future__ import annotations

import math
import os
import platform
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import tomllib

from edge_ft.contracts import MB
from edge_ft.errors import UserError

ARCHES = ("aarch64", "armv7l", "armv6l", "x86_64")
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
AUTO = "auto"
_AUTO_KEYS = {"arch", "cores", "threads", "ram_mb", "budget_mb"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
PROFILES_ENV = "EDGE_FT_PROFILES"
SHIPPED_DIR = "device_profiles"  # the boards: a folder beside this module, package data of the wheel


@dataclass(frozen=True)
class DeviceProfile:
    name: str  # file stem; how commands and results refer to the profile
    description: str  # the board in words ("Raspberry Pi 3 Model B")
    arch: str  # instruction set the board runs: aarch64 | armv7l | armv6l | x86_64
    cpu: str  # core type and clock ("4x Cortex-A53 @ 1.2 GHz"), for people
    cores: int  # CPU cores the application may use
    ram_mb: int  # installed RAM, MiB
    budget_mb: int  # RAM left to the application once the OS (and desktop, GPU carve-out) took theirs, MiB
    threads: int  # worker threads to run with (BLAS/OpenMP pools, ORT intra-op); at most `cores`
    cpu_speed: float  # one core's speed relative to the reference core (edge-ft profile calibrate prints it)
    cpu_speed_source: str  # where cpu_speed comes from: "estimate: ..." or "measured: ..."
    thread_scaling: tuple[float, ...] = ()  # speed-up of 1, 2, ... `cores` threads over one (empty: linear)
    thread_scaling_source: str = ""  # where thread_scaling comes from
    native: bool = False  # True: the profile *is* the machine we run on, so runs are never confined
    notes: str = ""  # anything a user should know (OS image assumed, caveats)
    path: Path | None = field(default=None, compare=False)  # the file it came from

    @property
    def budget_bytes(self) -> int:
        return self.budget_mb * MB

    def thread_speedup(self, threads: int) -> float:
        """How much faster `threads` busy threads go than one on this board (shared L2 and memory bandwidth)."""
        n = max(1, min(threads, self.cores))
        return self.thread_scaling[n - 1] if self.thread_scaling else float(n)

    @property
    def cpu_speed_is_estimate(self) -> bool:
        return not self.cpu_speed_source.lower().startswith("measured")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}
        d["thread_scaling"] = list(self.thread_scaling)
        d["path"] = str(self.path) if self.path else None
        return d


_REQUIRED = {"description": str, "arch": str, "cpu": str, "cores": int, "ram_mb": int, "budget_mb": int,
             "threads": int, "cpu_speed": float, "cpu_speed_source": str}
_OPTIONAL = {"native": bool, "notes": str, "thread_scaling": list, "thread_scaling_source": str}


def shipped_profiles_dir() -> Path:
    """The shipped boards: the folder beside this module (in a wheel and in a checkout alike)."""
    return Path(__file__).with_name(SHIPPED_DIR)


def search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    return extra + [shipped_profiles_dir()]


def profile_paths() -> dict[str, Path]:
    """name -> file, earlier search folders winning."""
    found: dict[str, Path] = {}
    for folder in search_dirs():
        if folder.is_dir():
            for p in sorted(folder.glob("*.toml")):
                found.setdefault(p.stem, p)
    return found


def list_profiles() -> list[DeviceProfile]:
    return [load_profile_file(p) for p in profile_paths().values()]


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """A profile by name (`rpi-3b`) or by path (anything with a slash or ending in .toml)."""
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text or "/" in text:
        return load_profile_file(Path(text))
    paths = profile_paths()
    if text not in paths:
        known = ", ".join(sorted(paths)) or "none"
        raise UserError(f"no device profile named {text!r} (known: {known}); "
                        "give a path to a .toml file or see `edge-ft profile list`")
    return load_profile_file(paths[text])


def load_profile_file(path: Path) -> DeviceProfile:
    if not path.is_file():
        raise UserError(f"{path}: no such profile file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_profile(raw, path)


def parse_profile(raw: dict[str, Any], path: Path) -> DeviceProfile:
    """Check keys, types and values of a parsed TOML table; every failure names the file and the key."""
    name = path.stem
    if not _NAME.match(name):
        raise UserError(f"{path}: profile file names must be lower-case letters, digits, '.', '_' or '-'")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        allowed = ", ".join(list(_REQUIRED) + list(_OPTIONAL))
        raise UserError(f"{path}: unknown key {unknown[0]!r} (allowed: {allowed})")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise UserError(f"{path}: missing key {missing[0]!r}")
    values = {k: _typed(path, k, raw[k], kind) for k, kind in {**_REQUIRED, **_OPTIONAL}.items() if k in raw}
    values = _resolve_auto(values)
    _check_values(path, values)
    return DeviceProfile(name=name, path=path, **values)


def _typed(path: Path, key: str, value: Any, kind: type) -> Any:
    if value == AUTO and key in _AUTO_KEYS:
        return AUTO
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))
          or kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        hint = ' or "auto"' if key in _AUTO_KEYS else ""
        raise UserError(f"{path}: key {key!r} must be {kind.__name__}{hint}, got {value!r}")
    return float(value) if kind is float else value


def _resolve_auto(values: dict[str, Any]) -> dict[str, Any]:
    """Fill "auto" from this machine: usable cores, total RAM, RAM available right now."""
    if AUTO not in values.values():
        return values
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    mem = psutil.virtual_memory()
    here = {"arch": normalise_arch(platform.machine()), "cores": cores, "ram_mb": mem.total // MB,
            "budget_mb": mem.available // MB}
    out = {k: (here[k] if v == AUTO and k in here else v) for k, v in values.items()}
    if out["threads"] == AUTO:
        out["threads"] = out["cores"]
    return out


def normalise_arch(machine: str) -> str:
    m = machine.lower()
    return _ARCH_ALIASES.get(m, m)


def _check_values(path: Path, v: dict[str, Any]) -> None:
    def bad(key: str, why: str) -> NoReturn:
        raise UserError(f"{path}: key {key!r} = {v[key]!r} {why}")

    if normalise_arch(v["arch"]) not in ARCHES:
        bad("arch", f"is not a known architecture (choose one of {', '.join(ARCHES)})")
    v["arch"] = normalise_arch(v["arch"])
    for key in ("cores", "threads", "ram_mb", "budget_mb"):
        if v[key] < 1:
            bad(key, "must be a positive integer")
    if v["budget_mb"] > v["ram_mb"]:
        bad("budget_mb", f"exceeds ram_mb = {v['ram_mb']}; the budget is the part of RAM left to the application")
    if v["threads"] > v["cores"]:
        bad("threads", f"exceeds cores = {v['cores']}")
    if not (math.isfinite(v["cpu_speed"]) and v["cpu_speed"] > 0):
        bad("cpu_speed", "must be a positive number (1.0 = the reference core)")
    for key in ("description", "cpu", "cpu_speed_source"):
        if not v[key].strip():
            bad(key, "must not be empty")
    if "thread_scaling" in v:
        _check_thread_scaling(path, v)


def _check_thread_scaling(path: Path, v: dict[str, Any]) -> None:
    """thread_scaling = [1.0, s2, ..., s_cores]: starts at 1, never falls, n threads at most n times one."""
    scaling = v["thread_scaling"]
    ok = (len(scaling) == v["cores"] and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                             and math.isfinite(x) for x in scaling))
    ok = ok and scaling[0] == 1 and all(b >= a for a, b in zip(scaling, scaling[1:]))
    ok = ok and all(x <= n for n, x in enumerate(scaling, start=1))
    if not ok:
        raise UserError(f"{path}: key 'thread_scaling' = {scaling!r} must list the speed-up of 1..cores "
                        f"({v['cores']}) threads over one: starting at 1.0, never decreasing, n threads at most n")
    if not v.get("thread_scaling_source", "").strip():
        raise UserError(f"{path}: key 'thread_scaling' needs a 'thread_scaling_source' saying where it comes from")
    v["thread_scaling"] = tuple(float(x) for x in scaling)
