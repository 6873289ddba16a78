# The small VM of `make test-cgroup-v2`: Debian's kernel and a busybox initramfs, booted by qemu-system-x86 with the
# host's root filesystem shared read-only over virtio-9p. Sourced by tools/test-cgroup-v2.sh; runs as root.
#
# Nothing is installed into the host's boot setup: the kernel package is fetched with `apt-get download` and only
# vmlinuz and the modules the initramfs needs are kept, with busybox, in $CGV2_CACHE_DIR/cgroup-v2-vm-VERSION/.

CGV2_CACHE_DIR=${EDGE_FT_CGV2_CACHE:-/var/cache/edge-ft}
CGV2_KERNEL_META=linux-image-amd64   # Debian's current kernel for this release (bookworm: 6.1)
CGV2_MEMORY_MB=${CGV2_MEMORY_MB:-2560}
CGV2_CPUS=${CGV2_CPUS:-2}
CGV2_ACCEL=${CGV2_ACCEL:-auto}       # auto (KVM where /dev/kvm opens, else TCG) | kvm | tcg
CGV2_TESTS=${CGV2_TESTS:-}           # pytest arguments run inside the VM; empty: default_tests ACCEL
CGV2_VM_DIR=""                       # set by ensure_vm_files
CGV2_BUILT=""                        # "cached" or "fetched in N s"

log() { printf '[test-cgroup-v2 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# apt_install PACKAGE...: install what is missing, refreshing the package lists once if apt cannot find it.
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@" >/dev/null; } ||
        die "cannot install $* with apt-get"
}

ensure_host_tools() {
    command -v qemu-system-x86_64 >/dev/null && return 0
    log "installing qemu-system-x86"
    apt_install qemu-system-x86
}

# kernel_package: the versioned package linux-image-amd64 points at, as "NAME VERSION" (apt lists refreshed once
# when they know none, as on a fresh machine).
kernel_package() {
    local name version
    name=$(apt-cache depends "$CGV2_KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$name" ]; then
        apt-get update -qq >/dev/null 2>&1 || true
        name=$(apt-cache depends "$CGV2_KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    [ -n "$name" ] || return 1
    version=$(apt-cache policy "$name" | awk '/Candidate:/ {print $2; exit}')
    echo "$name $version"
}

# vm_dir_name PACKAGE VERSION: the cache folder of one kernel build (":" and "+" kept out of the path).
vm_dir_name() {
    echo "cgroup-v2-vm-${1#linux-image-}-$(printf '%s' "$2" | tr -c 'A-Za-z0-9.\n-' '_')"
}

# ensure_vm_files REPO PYTHON: set CGV2_VM_DIR to a cached folder with vmlinuz, modules/ and busybox; fetch and
# unpack them (kernel package and busybox-static, with `apt-get download`) when the current kernel has none yet.
# Without package lists or network, the newest cached folder is used.
ensure_vm_files() {
    local repo=$1 python=$2 pkg version dir tmp start
    mkdir -p "$CGV2_CACHE_DIR"
    if ! read -r pkg version < <(kernel_package); then
        CGV2_VM_DIR=$(ls -d "$CGV2_CACHE_DIR"/cgroup-v2-vm-* 2>/dev/null | tail -n1)
        [ -n "$CGV2_VM_DIR" ] || die "apt knows no $CGV2_KERNEL_META and nothing is cached in $CGV2_CACHE_DIR"
        CGV2_BUILT=cached
        return 0
    fi
    dir=$CGV2_CACHE_DIR/$(vm_dir_name "$pkg" "$version")
    CGV2_VM_DIR=$dir
    if [ -f "$dir/complete" ]; then
        CGV2_BUILT=cached
        return 0
    fi
    start=$(date +%s)
    log "fetching $pkg $version and busybox-static (apt-get download; nothing is installed)"
    tmp=$(mktemp -d "$CGV2_CACHE_DIR/.cgroup-v2-vm.XXXXXX")
    (cd "$tmp" && apt-get download -q "$pkg=$version" busybox-static >/dev/null 2>&1) ||
        { rm -rf "$tmp"; die "apt-get download $pkg busybox-static failed"; }
    dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/kernel"
    dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/busybox"
    rm -rf "$dir" && mkdir -p "$dir/modules"
    cp "$tmp"/kernel/boot/vmlinuz-* "$dir/vmlinuz"
    cp "$tmp/busybox/bin/busybox" "$dir/busybox"
    # Only the modules the initramfs loads (a few hundred KB of the package's ~400 MB).
    "$python" "$repo/tools/cgroup-v2/initramfs.py" --modules "$tmp"/kernel/lib/modules/* --list |
        awk -F'\t' '$1 == "file" {print $3}' | xargs -r cp -t "$dir/modules/" ||
        { rm -rf "$tmp" "$dir"; die "cannot collect the 9p modules from $pkg"; }
    rm -rf "$tmp"
    echo "$pkg $version" >"$dir/complete"
    # Older kernels' folders are stale once a newer one is complete.
    find "$CGV2_CACHE_DIR" -maxdepth 1 -name 'cgroup-v2-vm-*' ! -path "$dir" -exec rm -rf {} +
    CGV2_BUILT="fetched in $(($(date +%s) - start)) s"
}

# kvm_usable: /dev/kvm opens read-write and the CPU shows hardware virtualization (vmx/svm). A VM without them can
# still offer /dev/kvm: there a guest kernel stalled right after decompression (2 minutes, no output), so use TCG.
kvm_usable() {
    [ -c /dev/kvm ] && { exec 9<>/dev/kvm; } 2>/dev/null && exec 9>&- &&
        grep -qw -e vmx -e svm "${CGV2_CPUINFO:-/proc/cpuinfo}"
}

# pick_accel: "kvm" or "tcg" from CGV2_ACCEL.
pick_accel() {
    case $CGV2_ACCEL in
        kvm | tcg) echo "$CGV2_ACCEL" ;;
        auto) if kvm_usable; then echo kvm; else echo tcg; fi ;;
        *) die "CGV2_ACCEL must be auto, kvm or tcg (got '$CGV2_ACCEL')" ;;
    esac
}

# default_tests ACCEL: the test files that create cgroups. Under TCG a guest runs Python ~100x slower (numpy's
# import: 13 s of CPU), so test_emulate's and test_hostspeed's 30-60 s timeouts cannot hold under their CPU quotas;
# there only the v2 module runs, which times nothing against a clock.
default_tests() {
    if [ "$1" = kvm ]; then
        echo "tests/test_cgroup_v2.py tests/test_emulate.py tests/test_hostspeed.py tests/test_cancel.py" \
            "tests/test_cancel_commands.py"
    else
        echo "tests/test_cgroup_v2.py"
    fi
}

# kernel_cmdline WORK: serial console, no v1 controllers at all (a pure cgroup v2 machine), power off on panic.
kernel_cmdline() {
    echo "console=ttyS0 quiet loglevel=3 panic=-1 cgroup_no_v1=all edgeft_work=$1"
}

# qemu_args ACCEL VMDIR INITRAMFS WORK: set QEMU_ARGS. The host's / is shared read-only (tag hostroot) and WORK
# writable (tag results); multidevs=remap keeps inode numbers unique across the host's mounts.
qemu_args() {
    local accel=$1 vmdir=$2 initramfs=$3 work=$4
    QEMU_ARGS=(-nodefaults -no-user-config -nographic -no-reboot -serial stdio -monitor none
        -m "$CGV2_MEMORY_MB" -smp "$CGV2_CPUS"
        -kernel "$vmdir/vmlinuz" -initrd "$initramfs" -append "$(kernel_cmdline "$work")"
        -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
        -virtfs "local,path=$work,mount_tag=results,security_model=none,multidevs=remap")
    if [ "$accel" = kvm ]; then
        QEMU_ARGS+=(-accel kvm -cpu host)
    else
        QEMU_ARGS+=(-accel tcg -cpu max)
    fi
}
