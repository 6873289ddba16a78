"""Atomic file writes: a crash or power loss leaves the previous good file, never a half-written one.

Write to a temporary file in the same folder, flush, fsync, rename over the target, fsync the folder. Many files
that one later write commits may share one flush to disk instead (deferred_sync).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from edge_ft.errors import UserError

_deferred = threading.local()  # .active: inside deferred_sync(), atomic writes leave flushing to disk to its end


def _fsync_dir(folder: Path) -> None:
    if getattr(_deferred, "active", False):
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


TEMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import: mkstemp makes 0600 files, we give them the mode open() would have
# errno values that mean "the disk or the folder is the problem", not a bug: full, over quota, read-only, too big.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM}


def _cannot_write(path: Path, e: OSError) -> UserError:
    return UserError(f"cannot write {path}: {e.strerror or e}; choose a writable folder with free space")


def ensure_dir(folder: str | os.PathLike[str]) -> Path:
    """mkdir -p, with a one-line error when a path component is a file or the folder is not writable."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"cannot create folder {folder}: a file of that name exists; choose another path") from None
    except OSError as e:
        raise UserError(f"cannot create folder {folder}: {e.strerror or e}; choose a writable path") from None
    return folder


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open `path` for writing, as a context manager (`with ... as f: f.write(data)`).

    The file appears whole at `path` or not at all.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file name")
    ensure_dir(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=folder)
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK)
            try:
                yield f
            except OSError as e:
                if e.errno in _ENVIRONMENT_ERRNOS:  # the caller's f.write hit a full or failing disk
                    raise _cannot_write(path, e) from None
                raise
            try:
                f.flush()
                if not getattr(_deferred, "active", False):
                    os.fsync(f.fileno())
            except OSError as e:
                raise _cannot_write(path, e) from None
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _cannot_write(path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def deferred_sync() -> Iterator[None]:
    """Atomic writes inside the block skip their own fsyncs (file and folder) and the block ends with one os.sync():
    many small files (a fleet plan's per-device data and configs) cost one flush instead of two each. A crash inside
    the block may lose what it wrote, so use it where a write after the block commits the lot (plan.json)."""
    _deferred.active = True
    try:
        yield
    finally:
        _deferred.active = False
    os.sync()


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files of writes that a killed process (kill -9, OOM killer, power cut) never finished.

    Only atomic_open's own pattern (.NAME.XXXXXXXX.tmp) matches; call it where one process owns the folder.
    """
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.glob(f".*{TEMP_SUFFIX}"):
            if p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(path: str | os.PathLike[str], tensors: dict[str, Any],
                            metadata: dict[str, str] | None = None) -> None:
    """numpy arrays -> safetensors file, atomically (safetensors.numpy.save returns bytes)."""
    from safetensors.numpy import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return bool(renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0)


def replace_folder(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Put the finished folder `staging` (a sibling of `target`) at `target`, replacing what was there.

    An existing target is swapped out in one atomic step where Linux allows it, so a crash leaves the old folder
    or the new one at `target`, never neither; elsewhere it is moved aside to .NAME.old for the instant between
    two renames. The old folder is deleted afterwards.
    """
    staging, target = Path(staging), Path(target)
    try:
        if not target.exists():
            staging.rename(target)
        elif _exchange(staging, target):
            shutil.rmtree(staging, ignore_errors=True)  # it holds the old folder now
        else:
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise UserError(f"cannot replace {target}: {e.strerror or e}; choose a writable folder") from None
    _fsync_dir(target.parent)
