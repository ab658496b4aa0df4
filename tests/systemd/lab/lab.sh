#!/bin/bash
# lab.sh - a private systemd (252) as PID 1 of fresh namespaces, for the systemd tests.
# Adapted from the sdlab tool of the TheyChat workspace (tools/sdlab): same isolation,
# plus a copy-on-write /etc so that installing units and /etc/theychat stays inside.
#
#   lab.sh start               boot; wait until systemctl answers and boot is done
#   lab.sh exec CMD [ARG...]   run CMD inside all namespaces of the instance
#   lab.sh sc ARGS...          = exec systemctl --no-pager ARGS...
#   lab.sh jc ARGS...          = exec journalctl --no-pager ARGS...
#   lab.sh pid                 host PID of the private systemd
#   lab.sh stop [TIMEOUT]      `systemctl exit`, wait, escalate to SIGKILL only if
#                              needed, verify no process is left, remove the cgroup
#   lab.sh log                 the private systemd's own log (and the journal)
#
# Environment: LAB_NAME (instance name, default lab), LAB_STATE_ROOT (default
# /run/theychat-lab; STATE=$LAB_STATE_ROOT/$LAB_NAME), LAB_KEEP_STATE=1 keeps STATE.
#
# Isolation (see the sdlab README for the reasons):
# * cgroup: the instance gets <cgroup2 mount>/<our cgroup>/lab-NAME and a cgroup
#   namespace whose fresh cgroup2 mount shows only that subtree; systemd runs there in
#   unified mode and never touches the host's hierarchies.
# * container=theychat-lab: container mode (no kmsg, no global teardown on exit).
# * private /dev, read-only /sys and /proc/sys, a private network namespace with only
#   lo (systemd brings it up), private UTS and IPC.
# * /var and /etc are overlays whose upper layers are in STATE; /etc/systemd/system is
#   an empty tmpfs, and the unit path is /etc/systemd/system:units/ (no host unit).
# * journald runs (volatile), and forwards to the console, i.e. STATE/systemd.log.
set -euo pipefail

LAB_HOME=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
NAME=${LAB_NAME:-lab}
STATE=${LAB_STATE_ROOT:-/run/theychat-lab}/$NAME
INPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
SYSTEMD=${LAB_SYSTEMD:-/usr/lib/systemd/systemd}

die() { echo "lab[$NAME]: $*" >&2; exit 1; }
say() { echo "lab[$NAME]: $*" >&2; }

cg2_root() {
    local m
    m=$(findmnt -n -t cgroup2 -o TARGET | head -n1)
    [ -n "$m" ] || die "no cgroup2 mounted on the host"
    echo "$m"
}
cg_dir() { # host path of this instance's cgroup
    if [ -f "$STATE/cgroup" ]; then cat "$STATE/cgroup"; return; fi
    local cur
    cur=$(sed -n 's/^0:://p' /proc/self/cgroup)
    echo "$(cg2_root)${cur%/}/lab-$NAME"
}

alive() { # running and not a zombie
    [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || return 1
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
sdpid() { cat "$STATE/pid" 2>/dev/null || true; }
lpid() { cat "$STATE/launcher.pid" 2>/dev/null || true; }

in_ns() { # run "$@" in every namespace of the private systemd
    local p
    p=$(sdpid)
    alive "$p" || die "not running (no live $STATE/pid)"
    nsenter -t "$p" -m -u -i -n -p -C --wd=/ -- \
        env -i PATH="$INPATH" TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 \
        LANG=C.UTF-8 HOME=/root ${LAB_ENV:-} "$@"
}

cg_procs() { # all pids still in the instance cgroup tree
    local cg
    cg=$(cg_dir)
    [ -d "$cg" ] || return 0
    { find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null || true; } | sort -un
}

ns_foreign() { # pids in the instance's PID ns that systemd does not manage (exec'd)
    local p ns cgp
    p=$(sdpid); alive "$p" || return 0
    ns=$(readlink "/proc/$p/ns/pid") || return 0
    cgp=" $(cg_procs | tr '\n' ' ') "
    ls -l /proc/[0-9]*/ns/pid 2>/dev/null | awk -v ns="$ns" -v me="$p" -v cgp="$cgp" '
        $NF == ns { split($(NF-2), a, "/"); q = a[3];
                    if (q != me && index(cgp, " " q " ") == 0) print q }' || true
}

cmd_start() {
    if alive "$(sdpid)"; then die "already running (pid $(sdpid)); stop it first"; fi
    [ -x "$SYSTEMD" ] || die "no systemd at $SYSTEMD"
    local cg
    rm -rf "$STATE"; mkdir -p "$STATE"
    cg=$(cg_dir)
    if [ -d "$cg" ]; then
        [ -z "$(cg_procs)" ] || die "cgroup $cg still has processes: $(cg_procs | tr '\n' ' ')"
        find "$cg" -depth -type d -exec rmdir {} \;
    fi
    mkdir "$cg"
    echo "$cg" > "$STATE/cgroup"

    # /dev/console inside = a pty copied to STATE/systemd.log by console_logger.py
    : > "$STATE/systemd.log"; : > "$STATE/console"
    setsid "${LAB_PYTHON:-python3}" "$LAB_HOME/console_logger.py" "$STATE/systemd.log" \
        "$STATE/console.path" "$STATE/logger.pid" </dev/null >>"$STATE/systemd.log" 2>&1 &
    local i
    for i in $(seq 1 250); do [ -s "$STATE/console.path" ] && break; sleep 0.02; done
    [ -s "$STATE/console.path" ] || die "console logger did not start"

    # The launcher moves itself into the instance cgroup, then becomes unshare, which
    # forks inner.sh as PID 1 of the new PID namespace; inner.sh execs systemd.
    LAB_STATE="$STATE" LAB_UNIT_PATH="/etc/systemd/system:$LAB_HOME/units" \
    LAB_HOME="$LAB_HOME" LAB_SYSTEMD="$SYSTEMD" \
    setsid bash -c 'echo $$ > "$3" && echo $$ > "$1/cgroup.procs" && exec unshare --pid \
            --fork --mount --uts --ipc --cgroup --net --mount-proc --propagation private "$2"' \
        lab-launcher "$cg" "$LAB_HOME/inner.sh" "$STATE/launcher.pid" \
        </dev/null >>"$STATE/systemd.log" 2>&1 &
    local l= p=
    for i in $(seq 1 100); do l=$(lpid); [ -n "$l" ] && break; sleep 0.02; done
    [ -n "$l" ] || fail_start "launcher did not start"
    for i in $(seq 1 100); do
        p=$(cat "/proc/$l/task/$l/children" 2>/dev/null | awk '{print $1}') || true
        [ -n "$p" ] && break
        alive "$l" || fail_start "launcher died"
        sleep 0.05
    done
    [ -n "$p" ] || fail_start "no namespace init appeared"
    echo "$p" > "$STATE/pid"

    local t0=$SECONDS
    until in_ns systemctl show -p Version --value >/dev/null 2>&1; do
        alive "$p" || fail_start "systemd died during boot"
        [ $((SECONDS - t0)) -lt 20 ] || fail_start "systemd did not answer within 20s"
        sleep 0.05
    done
    local st
    st=$(in_ns timeout 30 systemctl is-system-running --wait 2>/dev/null) || true
    say "up: pid $p (host), state '$st'"
}

fail_start() {
    say "start failed: $*; log follows, then cleanup"
    sed 's/^/  | /' "$STATE/systemd.log" >&2 || true
    LAB_KEEP_STATE=1 cmd_stop 3 || true
    exit 1
}

cmd_stop() {
    local timeout=${1:-20} p l i f
    p=$(sdpid); l=$(lpid)
    if alive "$p"; then
        # 1. end processes started with `lab.sh exec` first: systemd-shutdown would
        # SIGSTOP them, their nsenter parent (outside) would stop too, never reap them.
        f=$(ns_foreign)
        if [ -n "$f" ]; then
            say "ending exec'd processes still running: $(echo $f)"
            kill $f 2>/dev/null || true
            for i in $(seq 1 20); do f=$(ns_foreign); [ -z "$f" ] && break; sleep 0.1; done
            [ -n "$f" ] && kill -9 $f 2>/dev/null || true
        fi
        # 2. the clean path: exit.target; in container mode PID 1 stops every unit,
        # kills what is left and exits.
        in_ns systemctl --no-block exit >/dev/null 2>&1 || say "systemctl exit failed"
        for i in $(seq 1 $((timeout * 10))); do alive "$p" || break; sleep 0.1; done
        if alive "$p"; then
            say "still alive after ${timeout}s: SIGRTMIN+14 (immediate poweroff)"
            kill -s RTMIN+14 "$p" 2>/dev/null || true
            for i in $(seq 1 50); do alive "$p" || break; sleep 0.1; done
        fi
        if alive "$p"; then
            say "still alive: SIGKILL to namespace init $p (kills the whole PID namespace)"
            for f in $(ns_foreign); do
                kill -CONT "$(awk '{print $4}' "/proc/$f/stat" 2>/dev/null)" 2>/dev/null || true
            done
            kill -9 "$p" 2>/dev/null || true
        fi
    fi
    for i in $(seq 1 50); do alive "$l" || break; sleep 0.1; done
    alive "$l" && { say "launcher $l still alive, SIGKILL"; kill -9 "$l" 2>/dev/null || true; }
    local g
    g=$(cat "$STATE/logger.pid" 2>/dev/null || true)
    if alive "$g"; then
        sleep 0.2; kill "$g" 2>/dev/null || true   # it drains the pty, then exits
        for i in $(seq 1 20); do alive "$g" || break; sleep 0.05; done
        if alive "$g"; then kill -9 "$g" 2>/dev/null || true; fi
    fi
    local left
    left=$(cg_procs)
    if [ -n "$left" ]; then
        say "processes left in $(cg_dir): $left - SIGKILL"
        kill -9 $left 2>/dev/null || true
        sleep 0.3
        left=$(cg_procs)
    fi
    local cg
    cg=$(cg_dir)
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
    if [ -n "$left" ] || [ -d "$cg" ]; then
        die "cleanup incomplete: left pids '$left', cgroup $cg"
    fi
    say "stopped; no process left; cgroup removed"
    if [ "${LAB_KEEP_STATE:-0}" != 1 ]; then
        cp "$STATE/systemd.log" "${STATE%/}.last.log" 2>/dev/null || true
        rm -rf "$STATE"
    fi
}

cmd=${1:-}; shift || true
case "$cmd" in
    start) cmd_start ;;
    exec) [ $# -gt 0 ] || die "usage: lab.sh exec CMD [ARGS]"; in_ns "$@" ;;
    sc) in_ns systemctl --no-pager "$@" ;;
    jc) in_ns journalctl --no-pager "$@" ;;
    pid) p=$(sdpid); alive "$p" && echo "$p" || die "not running" ;;
    stop) cmd_stop "$@" ;;
    log) cat "$STATE/systemd.log" 2>/dev/null || cat "${STATE%/}.last.log" ;;
    *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
