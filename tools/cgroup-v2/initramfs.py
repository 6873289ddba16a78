"""The initramfs of `make test-cgroup-v2`: busybox, the 9p-over-virtio modules in load order, and /init.

Stdlib only (runs with any python3). Debian's kernel package ships no modules.dep (depmod makes it at install time,
and the host's boot setup is never touched), so each module's dependencies are read from the `depends=` entry of
its own .modinfo section.

    python3 initramfs.py --modules MODDIR --busybox BUSYBOX --init INIT.sh --out initramfs.cpio.gz
    python3 initramfs.py --modules MODDIR --list      prints KIND<tab>NAME<tab>SOURCE per entry, builds nothing
"""

from __future__ import annotations

import argparse
import gzip
import re
import sys
from pathlib import Path

# What /init needs to mount the host's root filesystem over virtio-9p; their dependencies follow from .modinfo.
WANTED = ("virtio_pci", "9pnet_virtio", "9p")
# busybox applets /init and the chrooted run use before the host's own /bin is reachable.
APPLETS = ("sh", "mount", "umount", "mkdir", "insmod", "chroot", "cat", "echo", "sleep", "poweroff", "sync",
           "grep", "ls", "env")


def module_index(moddir: Path) -> dict[str, Path]:
    """module name (dashes as underscores, as the kernel does) -> .ko file under MODDIR."""
    return {p.name.split(".ko")[0].replace("-", "_"): p for p in sorted(moddir.rglob("*.ko*"))}


def module_depends(path: Path) -> list[str]:
    """The `depends=` list a module's .modinfo section carries (empty when it needs none)."""
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", path.read_bytes())
    if match is None:
        raise ValueError(f"{path}: no depends= entry in .modinfo (compressed or not a kernel module?)")
    return [name.decode().replace("-", "_") for name in match.group(1).split(b",") if name]


def load_order(wanted: tuple[str, ...], depends: dict[str, list[str]]) -> list[str]:
    """Modules to insmod, every one after all it depends on; each once, in first-needed order."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"module dependency cycle through {name}")
        if name not in depends:
            raise ValueError(f"module {name} is not in the kernel package")
        visiting.add(name)
        for dep in depends[name]:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def resolve(moddir: Path, wanted: tuple[str, ...] = WANTED) -> list[Path]:
    """The .ko files to load, in load order."""
    index = module_index(moddir)
    depends: dict[str, list[str]] = {}
    pending = list(wanted)
    while pending:
        name = pending.pop()
        if name in depends or name not in index:
            continue
        depends[name] = module_depends(index[name])
        pending += depends[name]
    return [index[name] for name in load_order(wanted, depends)]


def archive_entries(modules: list[Path]) -> list[tuple[str, str, str]]:
    """(path in the archive, kind, source): kind is dir | file | exec | link (source = link target) | init."""
    entries = [(d, "dir", "") for d in ("bin", "dev", "proc", "sys", "host", "modules")]
    entries.append(("bin/busybox", "exec", "busybox"))
    entries += [(f"bin/{applet}", "link", "busybox") for applet in APPLETS]
    # Numbered so that /init loads them with one glob, in order.
    entries += [(f"modules/{i:02d}-{ko.name}", "file", str(ko)) for i, ko in enumerate(modules)]
    entries.append(("init", "init", "init"))
    return entries


def _newc(name: str, mode: int, data: bytes, ino: int) -> bytes:
    """One entry of a cpio "newc" archive, the format the kernel unpacks an initramfs from."""
    name_bytes = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_bytes), 0)
    header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    pad = lambda n: b"\0" * (-n % 4)  # noqa: E731  name and data are each padded to 4 bytes
    return header + name_bytes + pad(len(header) + len(name_bytes)) + data + pad(len(data))


def write_archive(out: Path, entries: list[tuple[str, str, str]], busybox: Path, init: Path) -> None:
    blobs = []
    for ino, (name, kind, source) in enumerate(entries, start=1):
        if kind == "dir":
            blobs.append(_newc(name, 0o040755, b"", ino))
        elif kind == "link":
            blobs.append(_newc(name, 0o120777, source.encode(), ino))
        else:
            path = {"exec": busybox, "init": init}.get(kind, Path(source))
            blobs.append(_newc(name, 0o100755 if kind in ("exec", "init") else 0o100644, path.read_bytes(), ino))
    blobs.append(_newc("TRAILER!!!", 0, b"", 0))
    tmp = out.with_name(out.name + ".tmp")
    with gzip.open(tmp, "wb", compresslevel=1) as f:  # the kernel unpacks gzip; level 1: fast, small enough
        f.write(b"".join(blobs))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=Path, required=True, help="the kernel's lib/modules/VERSION folder")
    parser.add_argument("--busybox", type=Path, help="a static busybox binary")
    parser.add_argument("--init", type=Path, help="the /init script")
    parser.add_argument("--out", type=Path, help="the gzip'd cpio archive to write")
    parser.add_argument("--list", action="store_true", help="print the archive's entries and build nothing")
    args = parser.parse_args(argv)
    try:
        entries = archive_entries(resolve(args.modules))
    except (OSError, ValueError) as e:
        print(f"initramfs: {e}", file=sys.stderr)
        return 1
    if args.list:
        print("\n".join(f"{kind}\t{name}\t{source}" for name, kind, source in entries))
        return 0
    if not (args.busybox and args.init and args.out):
        parser.error("--busybox, --init and --out are needed to build")
    write_archive(args.out, entries, args.busybox, args.init)
    return 0


if __name__ == "__main__":
    sys.exit(main())
