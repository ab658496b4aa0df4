#!/bin/bash
# lab inner stage: PID 1 of the fresh namespaces (started by lab.sh through `unshare
# --pid --fork --mount --uts --ipc --cgroup --net --mount-proc`); prepares a
# container-like view of the system, then execs systemd.
# Expects LAB_STATE LAB_UNIT_PATH LAB_HOME LAB_SYSTEMD from lab.sh.
set -eu
S=$LAB_STATE

# the host pty for /dev/console, bound onto a file in STATE before /dev is replaced
mount --bind "$(cat "$S/console.path")" "$S/console"

# /sys: a fresh read-only sysfs (this netns only), and a fresh cgroup2 on top: in the
# new cgroup namespace it shows only our subtree, so systemd runs in unified mode there.
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup

# /proc/sys read-only: systemd as PID 1 would otherwise raise the host's sysctls.
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
if [ -e /proc/sysrq-trigger ]; then
    mount --bind /proc/sysrq-trigger /proc/sysrq-trigger
    mount -o remount,bind,ro /proc/sysrq-trigger
fi

# a private /dev
mount -t tmpfs -o nosuid,noexec,mode=755,size=4m lab-dev /dev
mknod -m 666 /dev/null    c 1 3
mknod -m 666 /dev/zero    c 1 5
mknod -m 666 /dev/full    c 1 7
mknod -m 666 /dev/random  c 1 8
mknod -m 666 /dev/urandom c 1 9
mknod -m 666 /dev/tty     c 5 0
mkdir -m 755 /dev/pts /dev/mqueue /dev/hugepages
mkdir -m 1777 /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm
mount -t mqueue -o nosuid,nodev,noexec mqueue /dev/mqueue 2>/dev/null || true
# systemd logs to /dev/console only if it is a tty: the pty read by console_logger.py
touch /dev/console
mount --bind "$S/console" /dev/console
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr

# /var and /etc: copy-on-write overlays, so StateDirectory=, the journal, installed
# units and /etc/theychat land in STATE and never on the host.
for d in var etc; do
    mkdir -p "$S/$d.upper" "$S/$d.work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$S/$d.upper,workdir=$S/$d.work" "/$d"
done

# /etc/systemd/system: empty (no host unit is loaded); first on the unit path, so
# `systemctl enable` works inside.
mount -t tmpfs -o mode=755,size=4m lab-etc-systemd /etc/systemd/system

# journald: volatile, everything also forwarded to /dev/console
mount --bind "$LAB_HOME/journald.conf" /etc/systemd/journald.conf

exec env -i \
    container="theychat-lab" \
    SYSTEMD_UNIT_PATH="$LAB_UNIT_PATH" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    "$LAB_SYSTEMD" --system --unit=minimal.target \
        --log-target=journal-or-kmsg --log-level=info \
        --log-color=no --show-status=no
