"""The supervision tree's one declaration, and the places that must agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from theychat.daemons import systemd
from theychat.daemons.paths import StatePaths
from theychat.daemons.soak.plan import daemons_of, supervisor_of
from theychat.daemons.tree import (
    MANAGER,
    ROLES,
    DaemonId,
    Role,
    command,
    every_daemon,
    holder,
    roots,
)

UNITS = Path(__file__).resolve().parents[2] / "units"


def test_names_read_back_as_the_daemons_they_name() -> None:
    for d in every_daemon(["rust", "go"]):
        assert DaemonId.parse(d.name) == d
    assert DaemonId(Role.SERVER_MONITOR, "rust").name == "server-monitor@rust"
    assert str(DaemonId(Role.ROUTER)) == "router"
    for bad in ("servr@rust", "server", "router@rust", ""):
        with pytest.raises(ValueError):
            DaemonId.parse(bad)


def test_who_supervises_whom() -> None:
    router, monitor = roots()
    assert (router.name, monitor.name) == ("router", "router-monitor")
    assert router.supervisor == monitor and monitor.supervisor == router
    assert DaemonId.parse("server@rust").supervisor == DaemonId.parse("server-monitor@rust")
    assert DaemonId.parse("server-monitor@rust").supervisor == router
    assert DaemonId(Role.MANAGER).supervisor is None
    assert [c.name for c in router.children(["rust", "go"])] == [
        "router-monitor", "server-monitor@rust", "server-monitor@go"]
    assert monitor.children(["rust"]) == [router]
    assert DaemonId.parse("server-monitor@go").children(["rust", "go"]) == [
        DaemonId.parse("server@go")]
    assert DaemonId.parse("server@go").children(["go"]) == []


def test_every_daemon_in_status_order_and_each_socket_holders_witness() -> None:
    assert [d.name for d in every_daemon(["a"])] == [
        "router", "router-monitor", "server@a", "server-monitor@a"]
    assert holder(None).name == "router" and holder("a").name == "server@a"
    paths = StatePaths(Path("/s"))
    assert paths.witness(None) == Path("/s/run/router-monitor.ctl")
    assert paths.witness("a") == Path("/s/run/server-monitor@a.ctl")


def test_a_role_with_a_topic_needs_one_and_others_take_none() -> None:
    with pytest.raises(ValueError):
        DaemonId(Role.SERVER)
    with pytest.raises(ValueError):
        DaemonId(Role.ROUTER, "rust")


def test_the_command_that_starts_a_daemon() -> None:
    d = DaemonId.parse("server@rust")
    assert command(d, "/s", "/c.yaml") == ["-m", "theychat.daemons.server", "--state-dir",
                                          "/s", "--config", "/c.yaml", "--topic", "rust"]
    assert command(DaemonId(Role.ROUTER), "/s", None, standby=True) == [
        "-m", "theychat.daemons.router", "--state-dir", "/s", "--standby"]


def test_the_soak_plans_faults_on_the_tree() -> None:
    assert daemons_of(["rust"]) == ["router", "router-monitor", "server@rust",
                                    "server-monitor@rust"]
    assert supervisor_of("server@rust") == "server-monitor@rust"
    assert supervisor_of("router") == "router-monitor"


@pytest.mark.parametrize("role", list(ROLES))
def test_each_roles_unit_runs_its_module_and_stops_in_its_shutdown_time(role: Role) -> None:
    spec = ROLES[role]
    unit = UNITS / systemd.unit_name(f"{role}@" if spec.per_topic else str(role))
    text = unit.read_text()
    assert f" -m {spec.module} " in text
    assert re.search(r"^TimeoutStopSec=(\d+)s$", text, re.M)[1] == str(  # type: ignore[index]
        spec.shutdown_ms // 1000)
    assert MANAGER.role not in ROLES
