#!/bin/sh
# /init of the `make test-cgroup-v2` VM (busybox sh, pid 1). Mounts the host's root filesystem read-only over
# virtio-9p, a writable 9p share of the run folder WORK on top of the same path, tmpfs scratch, proc/sys/dev and the
# unified cgroup2 hierarchy, then runs WORK/run.sh chrooted into the host's root, from a cgroup laid out as systemd
# lays out a service (/ci.slice/ci.service, controllers enabled down to the slice, the service holding processes),
# which is where a CI job's commands live. Writes WORK/exit and powers off.
export PATH=/bin

say() { echo "[vm-init] $*"; }
fail() { say "error: $*"; echo 99 >"$host$work/exit" 2>/dev/null; sync; poweroff -f; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
work=""
for arg in $(cat /proc/cmdline); do
    case $arg in edgeft_work=*) work=${arg#edgeft_work=} ;; esac
done
host=/host
[ -n "$work" ] || fail "no edgeft_work=PATH on the kernel command line"

for ko in /modules/*.ko; do
    insmod "$ko" || fail "insmod $ko"
done
opts=trans=virtio,version=9p2000.L,msize=524288
mount -t 9p -o "$opts,ro,cache=loose" hostroot "$host" || fail "cannot mount the host root (9p tag hostroot)"
mount -t 9p -o "$opts" results "$host$work" || fail "cannot mount the run folder $work (9p tag results)"
echo "$(cat /proc/uptime)" >"$host$work/booted"
mount -t proc proc "$host/proc"
mount -t sysfs sysfs "$host/sys"
mount -t devtmpfs devtmpfs "$host/dev"
mkdir -p "$host/dev/shm" "$host/dev/pts"
mount -t tmpfs tmpfs "$host/dev/shm"
mount -t tmpfs -o mode=1777 tmpfs "$host/tmp"
mount -t cgroup2 cgroup2 "$host/sys/fs/cgroup" || fail "cannot mount cgroup2"

cg=$host/sys/fs/cgroup
controllers=$(cat "$cg/cgroup.controllers")
say "kernel $(cat /proc/sys/kernel/osrelease), cgroup2 controllers: $controllers"
for c in cpu cpuset memory pids; do
    echo "+$c" >"$cg/cgroup.subtree_control" || fail "cannot enable $c at the cgroup2 root"
done
mkdir "$cg/ci.slice" "$cg/ci.slice/ci.service"
for c in cpu cpuset memory pids; do
    echo "+$c" >"$cg/ci.slice/cgroup.subtree_control" || fail "cannot enable $c in ci.slice"
done
echo $$ >"$cg/ci.slice/ci.service/cgroup.procs"

rc=0
chroot "$host" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/tmp/home LANG=C.UTF-8 \
    TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1 /bin/sh "$work/run.sh" || rc=$?
echo "$rc" >"$host$work/exit"
sync
umount "$host$work"
poweroff -f
