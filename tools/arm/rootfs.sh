# Debian arm64 root filesystems for `make test-arm`, one per suite: build once, cache as a tarball, restore in seconds.
# Sourced by tools/test-arm.sh and tools/arm/suite.sh; every function here runs as root on the x86 host.
#
# The cache key hashes the suite, the package list, requirements/device.txt and the text of the functions that
# build the rootfs (`declare -f`), so changing any of them rebuilds instead of reusing a stale tarball.
# Cache: $ARM_CACHE_DIR/arm-rootfs-SUITE-KEY.tar.zst (what the tests restore) and arm-base-SUITE-KEY.tar.zst
# (debootstrap only).

# The Raspberry Pi OS releases, as the Debian suites they are built on: bookworm (Python 3.11), trixie (3.13).
# The host's keyring (debian-archive-keyring 2023.3+deb12u2) already holds trixie's release keys.
ARM_KNOWN_SUITES=(bookworm trixie)
ARM_SUITE=""                                       # set by arm_suite_select
ARM_ARCH=arm64
ARM_PACKAGES=python3,python3-venv,ca-certificates  # the suite's own python3: cp311 / cp313 aarch64 wheels
ARM_VENV=/opt/edge-ft/venv                        # the device venv inside the rootfs
ARM_QEMU_CPU=${ARM_QEMU_CPU:-cortex-a53}           # emulated core: the Pi Zero 2 W / Pi 3 (ARMv8.0-A)
ARM_CACHE_DIR=${EDGE_FT_ARM_CACHE:-/var/cache/edge-ft}
ARM_BUILD_LOG=""                                   # debootstrap output of the last build of the suite (kept on failure)
ARM_BUILT=""                                       # after ensure_cached_rootfs: "cached" or "built in N s"
ARM_MOUNTS=()                                      # mount points we made, in mount order
BINFMT_MOUNTED=0                                   # we mounted binfmt_misc (undo on exit)
BINFMT_REGISTERED=""                               # the binfmt entry we registered (undo on exit)

log() { printf '[test-arm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# arm_suite_select SUITE: make SUITE the one every function below builds, caches and restores.
arm_suite_select() {
    [[ " ${ARM_KNOWN_SUITES[*]} " == *" $1 "* ]] ||
        die "unknown Debian suite '$1' in ARM_SUITES (known: ${ARM_KNOWN_SUITES[*]})"
    ARM_SUITE=$1
    ARM_BUILD_LOG=$ARM_CACHE_DIR/arm-rootfs-$1-build.log
}

# Install what the harness needs on a fresh Debian host (root only).
ensure_host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
    command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    command -v zstd >/dev/null || missing+=(zstd)
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
        die "cannot install ${missing[*]} with apt-get"
}

# The Debian mirror the host's apt already uses (deb822 .sources or one-line sources.list), for any suite: the
# main archive serves every release, whichever one the host runs. The argument (an apt folder) is for tests.
# No mirror configured: one line and a failure, never a host written here.
debian_mirror() {
    local apt=${1:-/etc/apt} uri
    uri=$(awk '/^URIs:/ {u=$2} /^Suites:/ && u && u !~ /security/ {print u; exit}' \
        "$apt"/sources.list.d/*.sources 2>/dev/null || true)  # no .sources file: awk fails, the next form may match
    [ -n "$uri" ] || uri=$(awk '$1=="deb" && $0 !~ /security/ && $0 ~ /debian/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' \
        "$apt"/sources.list "$apt"/sources.list.d/*.list 2>/dev/null | head -n1 || true)
    [ -n "$uri" ] || { echo "no Debian mirror in $apt/sources.list or $apt/sources.list.d: configure apt's sources first" >&2; return 1; }
    echo "$uri"
}

# Run aarch64 binaries transparently: mount binfmt_misc and register qemu-aarch64 with the F flag
# (the kernel opens the interpreter at registration, so it works inside a chroot without copying it there).
binfmt_enable() {
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount binfmt_misc -t binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc (need root)"
        BINFMT_MOUNTED=1
    fi
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 && return 0
    if update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 && [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        BINFMT_REGISTERED=qemu-aarch64
        return 0
    fi
    # No binfmt-support entry: register the static emulator directly (same magic/mask as qemu-user-static).
    local magic='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
    local mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
    echo ":edge-ft-aarch64:M::${magic}:${mask}:/usr/bin/qemu-aarch64-static:F" >/proc/sys/fs/binfmt_misc/register ||
        die "cannot register qemu-aarch64 with binfmt_misc"
    BINFMT_REGISTERED=edge-ft-aarch64
}

binfmt_restore() {
    if [ -n "$BINFMT_REGISTERED" ] && [ -e "/proc/sys/fs/binfmt_misc/$BINFMT_REGISTERED" ]; then
        echo -1 >"/proc/sys/fs/binfmt_misc/$BINFMT_REGISTERED" 2>/dev/null || true
    fi
    BINFMT_REGISTERED=""
    if [ "$BINFMT_MOUNTED" = 1 ]; then
        umount /proc/sys/fs/binfmt_misc 2>/dev/null || true
        BINFMT_MOUNTED=0
    fi
}

# mount_into ROOT TARGET ARGS...: mount inside the rootfs and remember it for unmount_all.
mount_into() {
    local root=$1 target=$2
    shift 2
    [ -e "$root$target" ] || mkdir -p "$root$target"
    mount "$@" "$root$target" || die "cannot mount $target in $root"
    ARM_MOUNTS+=("$root$target")
}

# A Raspberry Pi 3 / Zero 2 W /proc/cpuinfo (Cortex-A53, MIDR 0x410fd034), one entry per host CPU.
# qemu-user (7.2) passes the x86 host's /proc/cpuinfo through; onnxruntime's cpuinfo library parses it as ARM,
# finds no "CPU part" and dereferences NULL while importing. The CPU list must match /sys's present CPUs.
write_pi_cpuinfo() {
    local out=$1 range i
    : >"$out"
    for range in $(tr ',' ' ' </sys/devices/system/cpu/present); do
        for ((i = ${range%-*}; i <= ${range#*-}; i++)); do
            printf 'processor\t: %d\nBogoMIPS\t: 38.40\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i" >>"$out"
            printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd03\n' >>"$out"
            printf 'CPU revision\t: 4\n\n' >>"$out"
        done
    done
    printf 'Hardware\t: BCM2835\nRevision\t: a02082\nModel\t\t: Raspberry Pi 3 Model B Rev 1.2\n' >>"$out"
}

# What onnxruntime needs inside: /proc and /sys (CPU topology), /dev (urandom, null), an ARM /proc/cpuinfo.
mount_system() {
    local root=$1
    mount_into "$root" /proc -t proc proc
    mount_into "$root" /sys -t sysfs sysfs
    mount_into "$root" /dev --bind /dev
    mkdir -p "$root/run/edge-ft"
    write_pi_cpuinfo "$root/run/edge-ft/cpuinfo"
    mount_into "$root" /proc/cpuinfo --bind "$root/run/edge-ft/cpuinfo"
}

# Unmount, newest first; anything still mounted under ROOT afterwards is lazily detached.
unmount_all() {
    local root=$1 i m
    for ((i = ${#ARM_MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${ARM_MOUNTS[i]}" 2>/dev/null || umount -l "${ARM_MOUNTS[i]}" 2>/dev/null || true
    done
    ARM_MOUNTS=()
    [ -n "$root" ] || return 0
    for m in $(awk -v r="$root/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
}

# True when nothing is mounted below ROOT (checked before any rm -rf of a rootfs).
nothing_mounted_under() {
    ! awk -v r="$1/" 'index($2, r) == 1 {found=1} END {exit !found}' /proc/mounts
}

# remove_unmounted DIR...: rm -rf each DIR, unless something is still mounted below it: a /dev bind left behind
# would take the host's /dev with it.
remove_unmounted() {
    local dir
    for dir in "$@"; do
        if nothing_mounted_under "$dir"; then
            rm -rf --one-file-system "$dir"
        else
            log "left $dir in place: something is still mounted below it"
        fi
    done
}

# pip settings of the host (mirrors, find-links, CA bundle) as PIP_* variables for pip inside the chroot, in
# the global array PIP_ENV; local paths they name appear at the same path inside ROOT (directories bind-mounted
# read-only, files copied), so a host whose pip reads a local mirror works the same inside.
pip_env_for_chroot() {
    local root=$1 py=$2 line key value word path
    PIP_ENV=()
    while IFS= read -r line; do
        key=${line%%=*}
        key=${key#*.}
        value=${line#*=}
        value=${value#\'}
        value=${value%\'}
        case "$key" in
            index-url | extra-index-url | find-links | cert | trusted-host | timeout | default-timeout | proxy | constraint) ;;
            *) continue ;;
        esac
        [[ " ${PIP_ENV[*]} " == *" PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')="* ]] && continue  # env scope listed first wins
        for word in $value; do
            path=${word#file://}
            [ "${path#/}" != "$path" ] || continue
            # A local index (.../simple) links its files relative to its parent: share the whole repository.
            [ "$(basename "$path")" = simple ] && path=$(dirname "$path")
            if [ -d "$path" ] && ! mountpoint -q "$root$path"; then
                mount_into "$root" "$path" --bind "$path"
                mount -o remount,bind,ro "$root$path" || true
            elif [ -f "$path" ]; then
                mkdir -p "$root$(dirname "$path")" && cp "$path" "$root$path"
            fi
        done
        PIP_ENV+=("PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')=$value")
    done < <("$py" -m pip config list 2>/dev/null)
}

# Install the device requirements into a venv inside ROOT (with /proc,/sys,/dev mounted) using the host's pip
# settings; the import check runs on the emulated target core.
provision_venv() {
    local root=$1 repo=$2 host_py=$3
    pip_env_for_chroot "$root" "$host_py"
    rm -f "$root/etc/resolv.conf" && cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    cp "$repo/requirements/device.txt" "$root/tmp/device.txt"
    log "pip settings passed in: ${PIP_ENV[*]:-none}"
    chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="$ARM_QEMU_CPU" \
        "${PIP_ENV[@]}" sh -ec "
            python3 -m venv $ARM_VENV
            $ARM_VENV/bin/python -m pip install --no-cache-dir --no-compile -q -r /tmp/device.txt
            $ARM_VENV/bin/python -c 'import numpy, onnxruntime, psutil, safetensors'
            rm -f /tmp/device.txt"
    : >"$root/etc/resolv.conf"  # keep this host's details out of the tarball
    rm -rf "$root/root/.cache"
}

# debootstrap a minimal arm64 ARM_SUITE into ROOT (two stages: the second one runs under qemu).
debootstrap_base() {
    local root=$1 mirror
    mirror=$(debian_mirror) || exit 1
    log "debootstrap $ARM_SUITE/$ARM_ARCH from $mirror (first stage)"
    debootstrap --foreign --arch="$ARM_ARCH" --variant=minbase --include="$ARM_PACKAGES" \
        "$ARM_SUITE" "$root" "$mirror" >"$ARM_BUILD_LOG" 2>&1 ||
        { tail -n 20 "$ARM_BUILD_LOG" >&2; die "debootstrap first stage failed (log: $ARM_BUILD_LOG)"; }
    # The second stage resolves pre-dependencies by running perl over the suite's whole Packages list (56 MB for
    # trixie) several times per package, ~30 s a pass under emulation: 40+ minutes. It installs only what the first
    # stage already chose (debootstrap/debpaths), so keep just those stanzas, natively, before it starts.
    local list
    for list in "$root"/var/lib/apt/lists/*_Packages; do
        awk 'NR == FNR {keep[$1]; next} /^Package: / {on = ($2 in keep)} on' "$root/debootstrap/debpaths" "$list" \
            >"$list.trim" && mv "$list.trim" "$list"
    done
    log "debootstrap second stage (emulated)"
    chroot "$root" /debootstrap/debootstrap --second-stage >>"$ARM_BUILD_LOG" 2>&1 ||
        { tail -n 20 "$ARM_BUILD_LOG" >&2; die "debootstrap second stage failed (log: $ARM_BUILD_LOG)"; }
    unmount_all "$root"  # the second stage may leave its own /proc behind
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    rm -f "$ARM_BUILD_LOG"
}

# Cache keys: the base layer (debootstrap) and the full rootfs (base + device venv). Editing the package list or
# the recipe changes the key, so a stale tarball is never reused.
base_key() {
    { echo "$ARM_SUITE $ARM_ARCH $ARM_PACKAGES"; declare -f debootstrap_base; } | sha256sum | cut -c1-16
}
rootfs_key() {
    { base_key; echo "$ARM_VENV"; cat "$1/requirements/device.txt"; declare -f provision_venv; } |
        sha256sum | cut -c1-16
}

# pack_rootfs ROOT TARBALL: tar + zstd, renamed into place so a cache file is always whole.
pack_rootfs() {
    local root=$1 tarball=$2
    nothing_mounted_under "$root" || die "mounts left under $root; not packing"
    tar --numeric-owner -C "$root" -cf - . | zstd -q -T0 -10 -o "$tarball.tmp" || die "cannot pack $root"
    mv "$tarball.tmp" "$tarball"
}

# cache_paths REPO: set ARM_BASE_TARBALL and ARM_TARBALL, the cache files of ARM_SUITE for this repo's inputs.
cache_paths() {
    ARM_BASE_TARBALL="$ARM_CACHE_DIR/arm-base-$ARM_SUITE-$(base_key).tar.zst"
    ARM_TARBALL="$ARM_CACHE_DIR/arm-rootfs-$ARM_SUITE-$(rootfs_key "$1").tar.zst"
}

# prune_cache: delete ARM_SUITE's tarballs of older inputs (~100-150 MB each) and those of the suite-less names
# used before there were two suites; other suites' tarballs stay.
prune_cache() {
    find "$ARM_CACHE_DIR" -maxdepth 1 -type f \
        \( -name "arm-base-$ARM_SUITE-*.tar.zst" -o -name "arm-rootfs-$ARM_SUITE-*.tar.zst" \
        -o -regex '.*/arm-\(base\|rootfs\)-[0-9a-f]*\.tar\.zst' \) \
        ! -path "$ARM_TARBALL" ! -path "$ARM_BASE_TARBALL" -delete
}

# Set ARM_TARBALL to ARM_SUITE's cached rootfs for this repo's inputs, building it when missing: debootstrap (itself
# cached as arm-base-SUITE-KEY so a requirements change only re-runs pip) plus the device venv.
# (A global, not a printed path: `$(...)` would run the build in a subshell that the EXIT trap does not cover.)
ensure_cached_rootfs() {
    local repo=$1 host_py=$2 key base start root
    [ -n "$ARM_SUITE" ] || die "no suite selected (arm_suite_select)"
    cache_paths "$repo"
    base=$ARM_BASE_TARBALL
    key=$(rootfs_key "$repo")
    ARM_BUILT=cached
    [ -f "$ARM_TARBALL" ] && return 0
    mkdir -p "$ARM_CACHE_DIR"
    ARM_BUILD_DIR=$(mktemp -d "$ARM_CACHE_DIR/build.XXXXXX")
    root=$ARM_BUILD_DIR/root
    start=$(date +%s)
    log "no cached $ARM_SUITE rootfs for key $key: building it"
    if [ -f "$base" ]; then
        restore_rootfs "$base" "$root"
    else
        debootstrap_base "$root"
        pack_rootfs "$root" "$base"
        log "cached the debootstrap layer as $base after $(($(date +%s) - start)) s"
    fi
    mount_system "$root"
    log "installing requirements/device.txt into $ARM_VENV (emulated pip)"
    provision_venv "$root" "$repo" "$host_py"
    unmount_all "$root"
    pack_rootfs "$root" "$ARM_TARBALL"
    rm -rf --one-file-system "$ARM_BUILD_DIR"
    ARM_BUILD_DIR=""
    prune_cache
    ARM_BUILT="built in $(($(date +%s) - start)) s"
    log "$ARM_BUILT and cached $ARM_TARBALL ($(du -h "$ARM_TARBALL" | cut -f1))"
}

# Unpack TARBALL into ROOT (an empty folder); ARM_RESTORE_MS says how long it took.
restore_rootfs() {
    local tarball=$1 root=$2 start
    start=$(date +%s%N)
    mkdir -p "$root"
    zstd -q -dc "$tarball" | tar --numeric-owner -C "$root" -xf - || die "cannot unpack $tarball"
    ARM_RESTORE_MS=$((($(date +%s%N) - start) / 1000000))
    log "restored $(basename "$tarball") in $ARM_RESTORE_MS ms"
}
