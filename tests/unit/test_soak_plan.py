"""The soak's fault plan: a pure function of the seed that respects restart intensity."""

from __future__ import annotations

import itertools

from theychat.daemons.soak.plan import (
    HOST_AWAY_S,
    HOST_FAULT_GAP_S,
    HOST_KINDS,
    KINDS,
    daemons_of,
    plan,
    supervisor_of,
)

TOPICS = ["general", "random"]
CLIENTS = ["soak1", "soak2"]


def test_the_same_seed_gives_the_same_faults_and_another_seed_others() -> None:
    a = plan(5, 120, 2, TOPICS, CLIENTS)
    assert a == plan(5, 120, 2, TOPICS, CLIENTS)
    assert a != plan(6, 120, 2, TOPICS, CLIENTS)


def test_faults_are_spaced_and_stay_out_of_the_warmup_and_the_quiet_end() -> None:
    faults = plan(1, 60, 3, TOPICS, CLIENTS, warmup=3, quiet=8)
    assert [f.at for f in faults] == [3 + 3 * i for i in range(len(faults))]
    assert faults[-1].at <= 60 - 8


def test_a_long_plan_uses_every_kind_and_hits_every_daemon() -> None:
    faults = plan(2, 1800, 5, TOPICS, CLIENTS)
    assert {f.kind for f in faults} == set(KINDS)
    hit = {t for f in faults if f.kind != "client_reset" for t in f.targets}
    assert hit == set(daemons_of(TOPICS))


def test_a_pair_is_a_daemon_and_its_supervisor() -> None:
    for f in plan(3, 600, 2, TOPICS, CLIENTS, kinds=("kill_pair",)):
        victim, sup = f.targets
        assert sup == supervisor_of(victim)


def test_no_daemon_is_hit_more_often_than_its_supervisor_would_restart_it() -> None:
    faults = plan(4, 600, 1, ["t"], [], kinds=("kill",), max_hits=2, window_s=30)
    for f in faults:
        name = f.targets[0]
        recent = [g for g in faults if name in g.targets and f.at - 30 < g.at <= f.at]
        assert len(recent) <= 2


def test_client_resets_name_a_client() -> None:
    faults = plan(5, 100, 2, TOPICS, CLIENTS, kinds=("client_reset",))
    assert faults and all(f.targets[0] in CLIENTS for f in faults)


HOSTS = ["h0", "h1", "h2"]


def test_on_several_hosts_daemons_are_named_by_host_and_paired_on_their_host() -> None:
    assert daemons_of(["t"], HOSTS)[:2] == ["h0/router", "h0/router-monitor"]
    for f in plan(3, 600, 2, TOPICS, CLIENTS, kinds=("kill_pair",), hosts=HOSTS):
        victim, sup = f.targets
        assert sup == supervisor_of(victim) and sup.split("/")[0] == victim.split("/")[0]


def test_host_faults_leave_a_majority_and_every_host_back_before_the_end() -> None:
    faults = plan(7, 300, 2, TOPICS, CLIENTS, kinds=KINDS + HOST_KINDS, hosts=HOSTS)
    host_faults = [f for f in faults if f.kind in HOST_KINDS]
    assert {f.kind for f in host_faults} == set(HOST_KINDS)
    assert all(f.targets[0] in HOSTS for f in host_faults)
    times = [f.at for f in host_faults]
    assert all(b - a >= HOST_FAULT_GAP_S for a, b in itertools.pairwise(times))
    assert times[-1] + HOST_FAULT_GAP_S <= 300


def test_host_faults_need_hosts() -> None:
    assert plan(7, 300, 2, TOPICS, CLIENTS, kinds=HOST_KINDS) == []


def test_no_daemon_of_a_host_is_hit_while_the_host_comes_back() -> None:
    faults = plan(8, 600, 1, TOPICS, CLIENTS, kinds=KINDS + HOST_KINDS, hosts=HOSTS)
    for f in faults:
        if f.kind in HOST_KINDS:
            soon = [g for g in faults if f.at < g.at < f.at + HOST_AWAY_S
                    and g.kind not in (*HOST_KINDS, "client_reset")]
            assert soon and all(not t.startswith(f.targets[0] + "/")
                                for g in soon for t in g.targets)
