"""The soak's judge, on hand-made logs and transcripts: each check can fail."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from theychat.daemons.soak.judge import assess, percentiles

T0 = 1_800_000_000.0
RUN = {"traffic_from": T0, "traffic_until": T0 + 30, "clients": {"a": "x", "b": "x", "c": "x"}}
HEALTHY = {"rows": [{"name": "router", "state": "ready"}], "left_behind": []}


def ts(t: float) -> str:
    return datetime.fromtimestamp(T0 + t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ev(t: float, event: str, file: str = "server-monitor@x", **fields: Any) -> dict[str, Any]:
    return {"event": event, "ts": ts(t), "_t": T0 + t, "_file": file, **fields}


def msg(t: float, seq: int, sender: str, n: int, shown: bool = True) -> dict[str, Any]:
    return {"t": T0 + t, "ev": "message", "seq": seq, "sender": sender,
            "text": f"soak {sender} {n}", "shown": shown}


def ack(t: float, seq: int) -> dict[str, Any]:
    return {"t": T0 + t, "ev": "acked", "seq": seq}


def sent(t: float, n: int) -> dict[str, Any]:
    return {"t": T0 + t, "ev": "sent", "n": n}


KILL = {"at": 5.0, "t": T0 + 5, "kind": "kill", "targets": ["server@x"], "pids": {"server@x": 42}}
DEATH = [ev(5.003, "peer_declared_dead", child="server@x", child_pid=42, cause="exit"),
         ev(5.2, "restarted", child="server@x", child_pid=43)]


def clean() -> dict[str, list[dict[str, Any]]]:
    return {
        "a": [sent(1, 1), ack(1.01, 1), msg(2.01, 2, "b", 1), sent(6, 2), ack(6.01, 3)],
        "b": [msg(1.01, 1, "a", 1), sent(2, 1), ack(2.01, 2), msg(6.3, 3, "a", 2)],
        "c": [msg(1.01, 1, "a", 1), msg(2.01, 2, "b", 1), msg(6.3, 3, "a", 2)],
    }


def checks(verdict: Any) -> dict[str, tuple[bool, str]]:
    return {c.name: (c.ok, c.figure) for c in verdict.checks}


def test_a_clean_run_passes_with_its_figures() -> None:
    v = assess(RUN, [KILL], DEATH, clean(), HEALTHY)
    assert v.ok, v.violations
    f = v.faults[0]
    assert round(f.detection_s or 0, 3) == 0.003 and round(f.recovered_s or 0, 1) == 0.2
    assert round(f.outage_s or 0, 2) == 5.29  # b: 1.01 -> 6.3 spans the kill at 5
    assert v.groups["kill server"]["count"] == 1


def test_a_message_a_member_never_saw_is_a_gap() -> None:
    tr = clean()
    tr["c"].pop()  # c never shows seq 3
    v = assess(RUN, [KILL], DEATH, tr, HEALTHY)
    assert checks(v)["gaps"] == (False, "1")
    assert any("c: x seq 3 acknowledged to a, never shown" in x for x in v.violations)


def test_what_a_member_showed_twice_is_a_duplicate() -> None:
    tr = clean()
    tr["c"].append(msg(7, 3, "a", 2))
    assert checks(assess(RUN, [KILL], DEATH, tr, HEALTHY))["duplicates shown"] == (False, "1")


def test_a_replay_the_client_hid_is_no_duplicate() -> None:
    tr = clean()
    tr["c"].append(msg(7, 3, "a", 2, shown=False))
    assert assess(RUN, [KILL], DEATH, tr, HEALTHY).ok


def test_a_number_given_twice_is_caught() -> None:
    tr = clean()
    tr["b"].append(ack(6.5, 3))  # the forgetful server gave b's next line number 3 again
    c = checks(assess(RUN, [KILL], DEATH, tr, HEALTHY))
    assert c["sequence numbers acknowledged twice"] == (False, "1")


def test_members_that_disagree_on_a_number_are_caught() -> None:
    tr = clean()
    tr["c"][-1] = msg(6.3, 3, "a", 3)
    assert checks(assess(RUN, [KILL], DEATH, tr, HEALTHY))[
        "members disagreeing on a sequence number"] == (False, "1")


def test_a_death_without_a_fault_is_a_false_suspicion() -> None:
    extra = [ev(20, "peer_declared_dead", file="router", child="router-monitor",
                child_pid=7, cause="timeout")]
    v = assess(RUN, [KILL], DEATH + extra, clean(), HEALTHY)
    assert checks(v)["false suspicions"] == (False, "1")


def test_a_death_declared_twice_by_two_supervisors_is_one_fault() -> None:
    again = [ev(5.3, "peer_declared_dead", child="server@x", child_pid=42, cause="found_dead")]
    assert assess(RUN, [KILL], DEATH + again, clean(), HEALTHY).ok


def test_a_fault_with_no_restart_fails() -> None:
    v = assess(RUN, [KILL], DEATH[:1], clean(), HEALTHY)
    assert not v.ok
    assert v.faults[0].problems == ["no restarted for server@x"]


def test_a_fault_nobody_noticed_fails() -> None:
    v = assess(RUN, [KILL], [], clean(), HEALTHY)
    assert v.faults[0].problems == ["no peer_declared_dead for server@x"]


def test_an_unhealthy_end_or_a_leftover_process_fails() -> None:
    bad = {"rows": [{"name": "router", "state": "down"}], "left_behind": [99]}
    c = checks(assess(RUN, [KILL], DEATH, clean(), bad))
    assert not c["every daemon alive and ready at the end"][0]
    assert c["processes left behind"] == (False, "1")


def test_a_fault_that_could_not_be_injected_fails() -> None:
    skipped = {**KILL, "t": None, "skipped": "server@x was not back in time"}
    assert checks(assess(RUN, [skipped], [], clean(), HEALTHY))["faults injected"][0] is False


def test_percentiles_use_nearest_rank() -> None:
    assert percentiles([]) is None
    assert percentiles([3.0, 1.0, 2.0]) == (2.0, 3.0, 3.0)


def test_a_replacement_adopted_by_a_new_supervisor_counts_as_restarted() -> None:
    # The supervisor restarted its child, then died before the first beat: its
    # successor adopts the new process instead of logging `restarted`.
    adopted = [DEATH[0], ev(5.3, "child_adopted", child="server@x", child_pid=43)]
    assert assess(RUN, [KILL], adopted, clean(), HEALTHY).ok
    still_the_dead_one = [DEATH[0], ev(5.3, "child_adopted", child="server@x", child_pid=42)]
    assert not assess(RUN, [KILL], still_the_dead_one, clean(), HEALTHY).ok


# --- on several hosts (theychat soak --hosts 3) ------------------------------------------

LAB_RUN = {**RUN, "hosts": ["h0", "h1", "h2"]}
LAB_HEALTHY = {**HEALTHY, "sequencers": {"x": "h0"}}


def on(where: str, t: float, event: str, file: str = "router", **fields: Any
       ) -> dict[str, Any]:
    """An event logged on host `where` (by its `file` daemon)."""
    return {**ev(t, event, f"{where}/{file}", **fields), "_host": where}


def host_fault(kind: str, host: str = "h1") -> dict[str, Any]:
    return {"at": 5.0, "t": T0 + 5, "kind": kind, "targets": [host]}


def test_a_host_killed_and_back_is_matched_by_the_others_verdict_and_its_return() -> None:
    logs = [on("h0", 5.6, "host_declared_dead", host="h1", suspected_by=["h0", "h2"]),
            on("h2", 5.6, "host_declared_dead", host="h1", suspected_by=["h0", "h2"]),
            on("h0", 9.5, "host_joined", host="h1")]
    v = assess(LAB_RUN, [host_fault("host_kill")], logs, clean(), LAB_HEALTHY)
    assert v.ok, v.violations
    f = v.faults[0]
    assert f.group == "host kill host"
    assert round(f.detection_s or 0, 1) == 0.6 and round(f.recovered_s or 0, 1) == 4.5


def test_a_host_killed_that_never_comes_back_fails() -> None:
    logs = [on("h0", 5.6, "host_declared_dead", host="h1", suspected_by=["h0", "h2"])]
    v = assess(LAB_RUN, [host_fault("host_kill")], logs, clean(), LAB_HEALTHY)
    assert not v.ok
    assert any("h1 did not come back (host_joined)" in x for x in v.violations)


def test_a_partition_needs_the_host_to_give_up_its_clients_and_regain_the_cluster() -> None:
    verdict = on("h0", 5.6, "host_declared_dead", host="h1", suspected_by=["h0", "h2"])
    lost = on("h1", 10.1, "cluster_lost", away_s=5.0)
    back = on("h1", 13.0, "cluster_regained", lease=7)
    fault = [host_fault("partition")]
    assert assess(LAB_RUN, fault, [verdict, lost, back], clean(), LAB_HEALTHY).ok
    v = assess(LAB_RUN, fault, [verdict, back], clean(), LAB_HEALTHY)
    assert any("no cluster_lost on h1" in x for x in v.violations)


def test_a_host_declared_dead_without_a_host_fault_is_a_false_suspicion() -> None:
    kill = {**KILL, "targets": ["h1/router"], "pids": {"h1/router": 42}}
    logs = [on("h1", 5.003, "peer_declared_dead", "router-monitor", child="router",
               child_pid=42, cause="exit"),
            on("h1", 5.3, "restarted", "router-monitor", child="router", child_pid=43),
            on("h0", 5.6, "host_declared_dead", host="h1", suspected_by=["h0", "h2"])]
    v = assess(LAB_RUN, [kill], logs, clean(), LAB_HEALTHY)
    assert v.faults[0].problems == []  # the router's restart was seen, on its host
    assert checks(v)["false suspicions"] == (False, "1")


def test_a_daemon_is_matched_on_its_own_host_only() -> None:
    kill = {**KILL, "targets": ["h1/server@x"], "pids": {"h1/server@x": 42}}
    elsewhere = [on("h2", 5.003, "peer_declared_dead", "server-monitor@x", child="server@x",
                    child_pid=42, cause="exit"),
                 on("h2", 5.2, "restarted", "server-monitor@x", child="server@x")]
    v = assess(LAB_RUN, [kill], elsewhere, clean(), LAB_HEALTHY)
    assert "no peer_declared_dead for h1/server@x" in v.faults[0].problems


def test_a_topic_without_a_sequencer_at_the_end_fails() -> None:
    status = {**LAB_HEALTHY, "sequencers": {"x": None}}
    v = assess(LAB_RUN, [], [], clean(), status)
    assert checks(v)["every topic with a sequencer at the end"] == (False, "0 of 1")


def test_both_roots_of_a_host_killed_may_get_it_declared_dead() -> None:
    pair = {"at": 5.0, "t": T0 + 5, "kind": "kill_pair",
            "targets": ["h1/router", "h1/router-monitor"],
            "pids": {"h1/router": 42, "h1/router-monitor": 41}}
    logs = [on("h1", 5.5, "peer_declared_dead", "manager", child="router", child_pid=42,
               cause="exit", both_roots=True),
            on("h1", 5.5, "peer_declared_dead", "manager", child="router-monitor",
               child_pid=41, cause="exit"),
            on("h1", 6.0, "restarted", "manager", child="router"),
            on("h1", 6.0, "restarted", "manager", child="router-monitor"),
            on("h0", 5.6, "host_declared_dead", host="h1", suspected_by=["h0", "h2"])]
    v = assess(LAB_RUN, [pair], logs, clean(), LAB_HEALTHY)
    assert checks(v)["false suspicions"] == (True, "0"), v.violations


def test_a_stop_while_its_supervisor_adopts_the_target_is_no_missed_detection() -> None:
    stop = {"at": 5.0, "t": T0 + 5, "kind": "stop", "targets": ["server@x"],
            "pids": {"server@x": 42}}
    adopted = [ev(5.04, "child_adopted", child="server@x", child_pid=42)]
    assert assess(RUN, [stop], adopted, clean(), HEALTHY).faults[0].problems == []
    assert assess(RUN, [stop], [], clean(), HEALTHY).faults[0].problems == [
        "no peer_declared_dead for server@x"]
