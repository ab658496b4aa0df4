"""`theychat up | down | status | chat`: the command line of a TheyChat tree.

The command line is not part of the tree: `up` starts the router detached (the router
starts everything else) and waits until the whole tree reports ready; `down` stops it
with the `stopping` marker in place so that no supervisor restarts what is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from theychat.daemons import config, logs, passwords, procs
from theychat.daemons.config import Config
from theychat.daemons.errors import ConfigError, TheyChatError
from theychat.daemons.paths import StatePaths
from theychat.daemons.status import gather, live_daemons
from theychat.daemons.tree import MANAGER, ROOT, DaemonId, command, every_daemon

START_TIMEOUT_S = 20.0


class CliError(TheyChatError):
    pass


def _load(path: str | None) -> tuple[Config, StatePaths]:
    cfg = config.load(path)
    paths = StatePaths(cfg.resolved_state_dir())
    paths.ensure()
    return cfg, paths


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _shutdown_s(name: str) -> float:
    """How long a daemon gets between SIGTERM and SIGKILL: its role's shutdown time."""
    try:
        return DaemonId.parse(name).spec.shutdown_ms / 1000
    except ValueError:
        return MANAGER.shutdown_ms / 1000


def stop_tree(paths: StatePaths) -> int:
    """Stop every daemon of this state dir; no supervisor restarts what is stopped."""
    paths.stopping.touch(mode=0o600)
    signalled: dict[int, float] = {}
    quiet_since: float | None = None
    deadline = time.monotonic() + 2 * max(_shutdown_s(d.name) for d in every_daemon(["t"]))
    try:
        while time.monotonic() < deadline:
            live = live_daemons(paths)
            now = time.monotonic()
            if not live:
                # A spawn may be in flight: only a short quiet spell means all are gone.
                quiet_since = quiet_since or now
                if now - quiet_since > 0.5:
                    break
            else:
                quiet_since = None
            for name, rec in live.items():
                first = signalled.setdefault(rec.pid, now)
                if first == now:
                    procs.signal_process(rec, signal.SIGTERM)
                    procs.signal_process(rec, signal.SIGCONT)  # a stopped one must hear it
                elif now - first > _shutdown_s(name):
                    procs.signal_process(rec, signal.SIGKILL)
            time.sleep(0.05)
        for pidfile in paths.run.glob("*.pid"):
            left = procs.read_pidfile(pidfile)
            if left is None or not left.alive():
                pidfile.unlink(missing_ok=True)
    finally:
        paths.stopping.unlink(missing_ok=True)
    return len(signalled)


def _tail(path: Path, since: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _not_systemd(cfg: Config, instead: str) -> None:
    if cfg.supervision.backend == "systemd":
        raise CliError(f"supervision.backend is systemd: systemd runs this tree; {instead}")


def cmd_up(args: argparse.Namespace) -> int:
    _not_systemd(config.load(args.config), "use `systemctl start theychat.target`")
    cfg, paths = _load(args.config)
    running = live_daemons(paths)
    if running:
        names = ", ".join(f"{n} (pid {r.pid})" for n, r in running.items())
        raise CliError(f"already running in {paths.root}: {names}; run `theychat down` first")
    paths.stopping.unlink(missing_ok=True)
    for stale in paths.run.glob("*.pid"):
        stale.unlink()  # a fresh tree counts restarts from zero
    root = DaemonId(ROOT)
    err = paths.stderr(root.name)
    mark = err.stat().st_size if err.exists() else 0
    conf = str(Path(args.config).absolute()) if args.config else None
    pid = procs.spawn(command(root, str(paths.root), conf), err)
    started = procs.start_time(pid)
    host, port = cfg.listen.host, cfg.listen.port
    deadline = time.monotonic() + START_TIMEOUT_S
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        time.sleep(0.1)
        procs.reap(pid)
        rec = procs.read_pidfile(paths.pidfile(root.name))
        if not procs.alive(pid, started) and not (rec and rec.alive()):
            why = _tail(err, mark) or "the router exited during start"
            stop_tree(paths)
            raise CliError(f"TheyChat did not start: {why}")
        rows = gather(cfg, paths)
        if all(r["state"] == "ready" for r in rows) and port_open(host, port):
            break
    else:
        stop_tree(paths)
        late = ", ".join(f"{r['name']} ({r['state']})" for r in rows if r["state"] != "ready")
        raise CliError(f"TheyChat did not become ready in {START_TIMEOUT_S:.0f}s: {late}")
    # The root of the tree from now on: restarts the router pair if both die at once.
    manager = DaemonId(MANAGER.role)
    procs.spawn(command(manager, str(paths.root), conf), paths.stderr(manager.name))
    hint = (f"theychat chat --tls {host} {port}" if cfg.listen.tls.enabled
            else f"nc {host} {port}")
    print(f"TheyChat is up: {len(rows)} daemons, clients connect to {host}:{port} "
          f"(try: {hint}); state in {paths.root}", flush=True)
    if args.foreground:
        return _foreground(paths)
    return 0


def _foreground(paths: StatePaths) -> int:
    """Show every daemon's log as it is written; Ctrl-C stops the whole tree."""
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    offsets: dict[Path, int] = {}
    while not stop:
        fresh: list[str] = []
        for path in sorted(paths.logs.glob("*.log")):
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(offsets.get(path, 0))
                while (line := f.readline()).endswith("\n"):
                    fresh.append(line)
                offsets[path] = f.tell() - len(line.encode())
        # Interleave the daemons' lines by time (ISO timestamps sort as text).
        fresh.sort(key=lambda ln: ln.partition('"ts": "')[2][:27])
        for line in fresh:
            shown = logs.human(line)
            if shown:
                print(shown, file=sys.stderr, flush=True)
        time.sleep(0.2)
    print("stopping TheyChat ...", file=sys.stderr, flush=True)
    n = stop_tree(paths)
    print(f"stopped {n} daemons", file=sys.stderr, flush=True)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    _not_systemd(config.load(args.config), "use `systemctl stop theychat.target`")
    _, paths = _load(args.config)
    if not live_daemons(paths):
        print(f"TheyChat is not running in {paths.root}")
        return 0
    n = stop_tree(paths)
    left = live_daemons(paths)
    if left:
        raise CliError(f"could not stop: {', '.join(left)}")
    print(f"TheyChat is down: stopped {n} processes (the daemons and the process manager)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg, paths = _load(args.config)
    if args.cluster:
        return cluster_status(cfg, args.json)
    rows = gather(cfg, paths)
    healthy = all(r["state"] == "ready" for r in rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'ROLE':<16}{'TOPIC':<14}{'PID':>8}  {'STATE':<13}{'UPTIME':>9}{'RESTARTS':>10}")
        for r in rows:
            up = f"{r['uptime_s']:.0f}s" if r["uptime_s"] is not None else "-"
            restarts = "-" if r["restarts"] is None else r["restarts"]
            print(f"{r['role']:<16}{r['topic'] or '-':<14}{r['pid'] or '-':>8}  "
                  f"{r['state']:<13}{up:>9}{restarts:>10}")
        manager = procs.read_pidfile(paths.pidfile(MANAGER.role))
        root = (f"process manager pid {manager.pid}" if manager and manager.alive()
                else "no process manager (systemd, or stopped)")
        print(f"state dir: {paths.root}; {root}; {'healthy' if healthy else 'NOT healthy'}")
    return 0 if healthy else 1


def cluster_status(cfg: Config, as_json: bool) -> int:
    """Every host and every topic's sequencer and followers, from etcd; exit 0 only if
    every topic has a sequencer."""
    from theychat.daemons import clusterstatus

    if cfg.cluster is None:
        raise CliError("--cluster: this config has no `cluster` section (one host)")
    view = clusterstatus.run(cfg)
    if as_json:
        print(json.dumps(view, indent=2))
    else:
        print("\n".join(clusterstatus.show(view)))
    return 0 if all(t["sequencer"] for t in view["topics"]) else 1


def cmd_chat(args: argparse.Namespace) -> int:
    """Run the line client, a program of its own (`python -m theychat.client`, standard
    library only), with the config's address as its default."""
    env = dict(os.environ)
    if args.config:
        cfg = config.load(args.config)
        here = f"{cfg.listen.host}:{cfg.listen.port}"
        # This host's door first, then the cluster's others.
        doors = [here] + [d for d in (cfg.cluster.front_doors if cfg.cluster else [])
                          if d != here]
        env["THEYCHAT_SERVER"] = ",".join(doors)
    argv = [sys.executable, "-m", "theychat.client", *args.client_args]
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)
    return 1  # not reached: execve replaces this process


def cmd_cluster_key(args: argparse.Namespace) -> int:
    from theychat.daemons.cluster import make_key

    make_key(args.file)
    print(f"wrote {args.file} (mode 0600): copy it to every host of the cluster, readable "
          "only by the user TheyChat runs as, and name it in cluster.key_file")
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Print the hash to put in `operators[].password_hash`; the password never is."""
    if sys.stdin.isatty():
        password = getpass.getpass("operator password: ")
        if getpass.getpass("again: ") != password:
            raise CliError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise CliError("an empty password is not a password")
    print(passwords.make(password))
    return 0


def cmd_install_systemd(args: argparse.Namespace) -> int:
    from theychat.daemons import systemd

    systemd.install(Path(args.config) if args.config else None, Path(args.unit_dir),
                    reload=not args.no_reload)
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from theychat.daemons.soak import run

    try:
        return run.run(args)
    except (run.SoakError, ConfigError) as e:
        print(f"theychat soak: {e}", file=sys.stderr)
        return 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="theychat", description="TheyChat: chat that keeps going")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole tree and wait until it is ready")
    up.add_argument("--foreground", action="store_true",
                    help="stay in the terminal showing logs; Ctrl-C stops everything")
    down = sub.add_parser("down", help="stop every daemon of the state directory")
    status = sub.add_parser("status", help="show the tree; exit 0 only if all are healthy")
    status.add_argument("--json", action="store_true", help="print a JSON list")
    status.add_argument("--cluster", action="store_true",
                        help="show the cluster instead (read from etcd): every host, and "
                             "every topic's sequencer and followers")
    # Every argument but --config goes to the client, which parses (and explains) them.
    chat = sub.add_parser("chat", add_help=False,
                          help="a line client, like nc (`theychat chat --help`)")
    sub.add_parser("hash-password", help="hash an operator password (read from stdin)")
    key = sub.add_parser("cluster-key", help="make the shared secret of a cluster's hosts "
                         "(copy the file to every host: cluster.key_file)")
    key.add_argument("file", metavar="FILE", help="where to write it (must not exist)")
    sd = sub.add_parser("install-systemd",
                        help="install the systemd units and /etc/theychat/theychat.yaml")
    sd.add_argument("--config", metavar="FILE",
                    help="config to install (default: the installed one, else built in)")
    sd.add_argument("--unit-dir", default="/etc/systemd/system", metavar="DIR")
    sd.add_argument("--no-reload", action="store_true", help="skip systemctl daemon-reload")
    soak = sub.add_parser("soak", help="run a fresh tree under traffic and faults, judge it "
                          "from its logs, write a report")
    from theychat.daemons.soak.run import add_arguments

    add_arguments(soak)
    for s in (up, down, status, chat, soak):
        s.add_argument("--config", metavar="FILE", help="YAML config (default: built in)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.command != "chat":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.client_args = extra
    os.umask(0o077)
    handler = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "chat": cmd_chat,
               "hash-password": cmd_hash_password, "cluster-key": cmd_cluster_key,
               "install-systemd": cmd_install_systemd,
               "soak": cmd_soak}
    try:
        return handler[args.command](args)
    except ConfigError as e:
        print(f"theychat {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except TheyChatError as e:
        print(f"theychat {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
