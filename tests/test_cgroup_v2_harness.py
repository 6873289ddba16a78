"""`make test-cgroup-v2`'s pieces that run without qemu or root: module load order and the initramfs archive
(tools/cgroup-v2/initramfs.py), the kernel command line and qemu arguments (tools/cgroup-v2/vm.sh), and the closing
summary (tools/cgroup-v2/summary.py)."""

import gzip
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
TOOLS = REPO / "tools" / "cgroup-v2"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"cgv2_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


initramfs = _load("initramfs")
summary = _load("summary")


def fake_modules(root: Path, depends: dict[str, str]) -> Path:
    """A lib/modules/VERSION tree of stand-in .ko files carrying only a .modinfo-style depends= entry."""
    for name, deps in depends.items():
        path = root / "kernel" / f"{name}.ko"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x7fELF junk\0license=GPL\0depends=" + deps.encode() + b"\0name=" + name.encode() + b"\0")
    return root


# The dependency graph of Debian's 6.1 kernel for the modules /init loads (read from its .modinfo sections).
DEBIAN_61 = {"virtio_ring": "", "virtio": "", "virtio_pci_modern_dev": "", "virtio_pci_legacy_dev": "",
             "virtio_pci": "virtio_ring,virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio", "9pnet": "",
             "9pnet_virtio": "virtio,9pnet,virtio_ring", "netfs": "", "fscache": "netfs", "9p": "9pnet,fscache,netfs",
             "ext4": "jbd2", "jbd2": ""}  # the last two: present in the package, not wanted


def test_modules_load_after_their_dependencies_each_once(tmp_path):
    files = initramfs.resolve(fake_modules(tmp_path, DEBIAN_61))
    names = [p.name.removesuffix(".ko") for p in files]
    assert sorted(names) == sorted(set(DEBIAN_61) - {"ext4", "jbd2"})
    for name, deps in DEBIAN_61.items():
        for dep in filter(None, deps.split(",")):
            if name in names:
                assert names.index(dep) < names.index(name), (dep, name)
    assert names[-1] == "9p"


def test_a_missing_module_or_a_cycle_is_named(tmp_path):
    no_fscache = {name: deps for name, deps in DEBIAN_61.items() if name != "fscache"}
    with pytest.raises(ValueError, match="module fscache is not in the kernel package"):
        initramfs.resolve(fake_modules(tmp_path / "a", no_fscache))
    with pytest.raises(ValueError, match="cycle through"):
        initramfs.load_order(("a",), {"a": ["b"], "b": ["a"]})
    bad = tmp_path / "b" / "kernel" / "x.ko.xz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xfd7zXZ compressed")
    with pytest.raises(ValueError, match="no depends= entry"):
        initramfs.resolve(tmp_path / "b", ("x",))


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, content) of a cpio newc archive."""
    entries, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110:name_end - 1].decode()
        body = name_end + (-name_end % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[body:body + size])
        pos = body + size + (-(body + size) % 4)


def test_archive_holds_busybox_its_applets_the_modules_in_order_and_an_executable_init(tmp_path):
    moddir = fake_modules(tmp_path / "mods", DEBIAN_61)
    (tmp_path / "busybox").write_bytes(b"BUSYBOX")
    out = tmp_path / "initramfs.cpio.gz"
    assert initramfs.main(["--modules", str(moddir), "--busybox", str(tmp_path / "busybox"),
                           "--init", str(TOOLS / "init.sh"), "--out", str(out)]) == 0
    entries = _read_newc(gzip.decompress(out.read_bytes()))
    assert entries["init"] == (0o100755, (TOOLS / "init.sh").read_bytes())
    assert entries["bin/busybox"] == (0o100755, b"BUSYBOX")
    assert all(entries[f"bin/{a}"] == (0o120777, b"busybox") for a in initramfs.APPLETS)
    modules = sorted(name for name in entries if name.startswith("modules/"))
    assert [m.split("-", 1)[1] for m in modules] == [p.name for p in initramfs.resolve(moddir)]
    assert {d for d, (mode, _) in entries.items() if mode == 0o040755} == {"bin", "dev", "proc", "sys", "host",
                                                                           "modules"}
    assert not list(tmp_path.glob("*.tmp"))


def test_list_prints_each_entry_with_its_source(tmp_path, capsys):
    moddir = fake_modules(tmp_path, DEBIAN_61)
    assert initramfs.main(["--modules", str(moddir), "--list"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    files = [row for row in rows if row[0] == "file"]
    assert files[-1][1] == "modules/09-9p.ko" and files[-1][2] == str(moddir / "kernel/9p.ko")
    assert rows[-1][:2] == ["init", "init"]


def test_init_uses_only_the_archive_s_applets_before_it_chroots():
    text = (TOOLS / "init.sh").read_text()
    before_chroot = text[:text.index("chroot \"$host\"")]
    used = set()
    for line in before_chroot.splitlines():
        words = line.strip().split()
        if words and words[0].isidentifier() and not line.lstrip().startswith("#") and "=" not in words[0]:
            used.add(words[0])
    shell = {"export", "for", "do", "done", "case", "esac", "if", "then", "fi", "say", "fail", "echo"}
    assert used - shell <= set(initramfs.APPLETS), used - shell - set(initramfs.APPLETS)
    assert subprocess.run(["sh", "-n", str(TOOLS / "init.sh")]).returncode == 0


# --- the shell side, without qemu or root ---

def _bash(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source tools/cgroup-v2/vm.sh; {script}"], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_kernel_command_line_is_v2_only_and_names_the_run_folder_as_init_reads_it():
    r = _bash("kernel_cmdline /var/tmp/edge-ft-cgv2.abc")
    args = r.stdout.split()
    assert {"console=ttyS0", "cgroup_no_v1=all", "panic=-1", "edgeft_work=/var/tmp/edge-ft-cgv2.abc"} <= set(args)
    assert "edgeft_work=*) work=${arg#edgeft_work=}" in (TOOLS / "init.sh").read_text()


@pytest.mark.parametrize("accel,cpu", [("kvm", "host"), ("tcg", "max")])
def test_qemu_shares_the_root_read_only_and_the_run_folder_writable(accel, cpu):
    r = _bash(f'qemu_args {accel} /cache/vm /w/initramfs.cpio.gz /w; printf "%s\\n" "${{QEMU_ARGS[@]}}"')
    args = r.stdout.splitlines()
    assert args[args.index("-accel") + 1] == accel and args[args.index("-cpu") + 1] == cpu
    assert args[args.index("-kernel") + 1] == "/cache/vm/vmlinuz"
    assert args[args.index("-initrd") + 1] == "/w/initramfs.cpio.gz"
    shares = [args[i + 1] for i, a in enumerate(args) if a == "-virtfs"]
    assert shares[0].startswith("local,path=/,mount_tag=hostroot,") and "readonly=on" in shares[0]
    assert shares[1].startswith("local,path=/w,mount_tag=results,") and "readonly" not in shares[1]
    assert args[args.index("-smp") + 1] == "2" and "-no-reboot" in args


def test_without_kvm_only_the_v2_module_runs_and_kvm_needs_vmx_or_svm(tmp_path):
    r = _bash('default_tests kvm; default_tests tcg; CGV2_TESTS="tests/x.py -k y"; echo "$CGV2_TESTS"')
    assert r.stdout.splitlines() == ["tests/test_cgroup_v2.py tests/test_emulate.py tests/test_hostspeed.py "
                                     "tests/test_cancel.py tests/test_cancel_commands.py",
                                     "tests/test_cgroup_v2.py", "tests/x.py -k y"]
    plain = tmp_path / "cpuinfo"
    plain.write_text("flags\t\t: fpu sse2 avx2 hypervisor\n")  # a VM whose CPU shows no virtualization
    r = _bash("kvm_usable && echo kvm || echo no", CGV2_CPUINFO=str(plain))
    assert r.stdout.strip() == "no"
    for forced in ("kvm", "tcg"):
        assert _bash("pick_accel", CGV2_ACCEL=forced, CGV2_CPUINFO=str(plain)).stdout.strip() == forced
    assert _bash("pick_accel", CGV2_CPUINFO=str(plain)).stdout.strip() == "tcg"


def test_cache_folder_name_keeps_the_package_version_path_safe():
    r = _bash("vm_dir_name linux-image-6.1.0-50-amd64 6.1.176-1+b2:x")
    assert r.stdout.strip() == "cgroup-v2-vm-6.1.0-50-amd64-6.1.176-1_b2_x"


def test_a_wrong_accel_is_refused_before_anything_runs(tmp_path):
    r = subprocess.run(["bash", "tools/test-cgroup-v2.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "CGV2_ACCEL": "hvf", "EDGE_FT_CGV2_CACHE": str(tmp_path)})
    assert r.returncode == 1 and "CGV2_ACCEL must be auto, kvm or tcg (got 'hvf')" in r.stderr
    assert list(tmp_path.iterdir()) == []


# --- the summary ---

def _junit(path: Path, cases: str) -> Path:
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return path


def test_summary_passes_only_when_every_case_ran_and_passed(tmp_path):
    ok = '<testcase classname="tests.test_cgroup_v2" name="test_a"/>'
    lines, status = summary.summarize(_junit(tmp_path / "a.xml", ok * 3), 0)
    assert status == 0 and lines == ["test-cgroup-v2: 3 passed, 0 failed"]
    measured = ('<testcase classname="t" name="test_m"><properties><property name="oom_kill" value="1"/>'
                '<property name="nr_throttled" value="40"/></properties></testcase>')
    lines, status = summary.summarize(_junit(tmp_path / "m.xml", measured), 0)
    assert status == 0 and lines == ["measured test_m: oom_kill=1, nr_throttled=40", "test-cgroup-v2: 1 passed, 0 failed"]
    skipped = '<testcase classname="tests.test_cgroup_v2" name="test_b"><skipped message="needs v2"/></testcase>'
    failed = '<testcase classname="t" name="test_c"><failure message="assert 1 == 2&#10;more">x</failure></testcase>'
    lines, status = summary.summarize(_junit(tmp_path / "b.xml", ok + skipped + failed), 1)
    assert status == 1 and lines[-1] == "test-cgroup-v2: 1 passed, 2 failed"
    assert "SKIPPED (counted as failed: the VM is cgroup v2) tests.test_cgroup_v2::test_b: needs v2" in lines
    assert "FAILED t::test_c: assert 1 == 2" in lines
    lines, status = summary.summarize(_junit(tmp_path / "c.xml", ""), 5)  # pytest collected nothing
    assert status == 1 and lines[-2:] == ["pytest exited 5", "test-cgroup-v2: 0 passed, 1 failed"]
    lines, status = summary.summarize(tmp_path / "absent.xml", 0)  # the VM never wrote one
    assert status == 1 and lines[-1] == "test-cgroup-v2: 0 passed, 1 failed"
