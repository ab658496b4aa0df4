"""Three hosts, for real: network namespaces on a bridge, an etcd member and a whole
TheyChat tree in each, people in a namespace of their own using `theychat chat` with
every front door (daemons/soak/lab.py). Points 4-9 of issue 11: chat across hosts, one
nick for the cluster, a host killed whole and brought back, a host cut off and healed,
a hung sequencer; and a checker over every transcript."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from tests.lineclient import LineClientProcess
from theychat.daemons.soak.lab import Lab, why_no_lab


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    reason = why_no_lab()
    if reason:
        pytest.skip(reason)
    lab = Lab(3, topics=["general", "random"])
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()


def person(lab: Lab, nick: str, host: int) -> LineClientProcess:
    """Someone whose first front door is host `host`'s."""
    doors = [h.door for h in lab.hosts]
    doors = doors[host:] + doors[:host]
    return LineClientProcess(",".join(doors), nick, netns=lab.clients)


def test_people_on_different_hosts_chat_in_one_topic(lab: Lab) -> None:
    ann, bob = person(lab, "ann", 0), person(lab, "bob", 1)
    try:
        ann.wait_event(type="ok", cmd="nick", nick="ann")
        bob.wait_event(type="ok", cmd="nick", nick="bob")
        ann.join("general")
        bob.join("general")
        ann.wait_event(type="presence", nick="bob", event="joined")
        ann.type("hello from h0")
        bob.wait(lambda evs: "hello from h0" in [e.get("text") for e in evs], "ann's line")
        bob.type("hello from h1")
        ann.wait(lambda evs: "hello from h1" in [e.get("text") for e in evs], "bob's line")
        assert ann.wait_event(type="sent", line=1)["seq"] == 1
    finally:
        ann.kill()
        bob.kill()


def texts(events: list[dict], kind: str) -> list[str]:  # type: ignore[type-arg]
    return [str(e.get("text")) for e in events if e.get("type") == kind]


def test_who_topics_msg_and_history_see_every_host(lab: Lab) -> None:
    cy, di = person(lab, "cy", 0), person(lab, "di", 2)
    try:
        cy.join("random")
        cy.type("before di came")
        cy.wait_event(type="sent", line=1)
        di.join("random")
        history = di.wait_event(type="history", topic="random")
        assert [m["text"] for m in history["messages"]] == ["before di came"]
        di.type("/who")
        assert di.wait_event(type="who", topic="random")["members"] == ["cy", "di"]
        di.type("/topics")
        counts = {t["name"]: t["members"] for t in di.wait_event(type="topics")["topics"]}
        assert counts["random"] == 2
        di.type("/msg cy psst")
        di.wait_event(type="ok", cmd="msg", to="cy")
        assert cy.wait_event(type="dm", text="psst")["from"] == "di"
        di.type("/leave")
        di.wait_event(type="left", topic="random")
        di.type("/msg cy from the lobby")
        cy.wait_event(type="dm", text="from the lobby")
        cy.type("/msg di back to you")
        di.wait_event(type="dm", text="back to you")
    finally:
        cy.kill()
        di.kill()


def test_two_hosts_racing_for_one_nick_exactly_one_wins(lab: Lab) -> None:
    racers = [person(lab, f"r{i}", i) for i in range(3)]
    try:
        for r in racers:
            r.wait_event(type="ok", cmd="nick")
        for r in racers:
            r.type("/nick prize")
        answers = []
        for r in racers:
            ev = r.wait(lambda evs: any((e.get("cmd") == "nick" and e.get("nick") == "prize")
                                        or e.get("code") == "nick_taken" for e in evs),
                        "an answer to /nick prize")
            answers.append("won" if any(e.get("nick") == "prize" for e in ev) else "lost")
        assert sorted(answers) == ["lost", "lost", "won"]
    finally:
        for r in racers:
            r.kill()


def test_create_operators_kick_ban_and_drop_across_hosts(lab: Lab) -> None:
    op, ev, vi = person(lab, "owner", 0), person(lab, "eve", 1), person(lab, "vic", 2)
    try:
        op.type("/create hall")
        op.wait_event(type="ok", cmd="create", topic="hall")
        ev.join("hall")
        vi.join("hall")
        op.wait_event(type="presence", nick="vic", event="joined")
        op.type("/kick eve off you go")
        left = ev.wait_event(type="left", topic="hall")
        assert left["topic"] == "hall"
        kicked = vi.wait_event(type="presence", nick="eve", event="kicked")
        assert kicked["by"] == "owner" and kicked["reason"] == "off you go"
        op.type("/ban vic")
        vi.wait_event(type="left", topic="hall")
        vi.type("/join hall")
        assert vi.wait_event(type="error", code="banned")["text"].startswith("you are banned")
        op.type("/drop hall")
        op.wait_event(type="left", topic="hall")
        ev.type("/topics")
        names = [t["name"] for t in ev.wait_event(type="topics")["topics"]]
        assert "hall" not in names
    finally:
        for p in (op, ev, vi):
            p.kill()


class Chatter:
    """People typing in one topic, and the check of what they all saw."""

    def __init__(self, people: list[LineClientProcess], topic: str) -> None:
        self.people, self.topic = people, topic
        self.typed: dict[str, list[str]] = {p.nick: [] for p in people}

    def round(self, n: int) -> None:
        for p in self.people:
            if p.proc.poll() is None:
                text = f"{p.nick} says {n}"
                p.type(text)
                self.typed[p.nick].append(text)

    def settle(self, timeout: float = 30.0) -> None:
        """Until every line typed is in every transcript (or the time is up)."""
        deadline = time.monotonic() + timeout
        want = {t for texts in self.typed.values() for t in texts}
        while time.monotonic() < deadline:
            if all(want - set(self.typed[p.nick]) <= {m["text"] for m in p.messages(self.topic)}
                   for p in self.people):
                return
            time.sleep(0.2)

    def check(self) -> dict[int, tuple[str, str]]:
        """One order for all, every line once, nothing missed; the log, seq -> line."""
        log: dict[int, tuple[str, str]] = {}
        for p in self.people:
            seqs = []
            for m in p.messages(self.topic):
                entry = (m["from"], m["text"])
                assert log.setdefault(m["seq"], entry) == entry, f"two lines at {m['seq']}"
                seqs.append(m["seq"])
            acked = [e for e in p.acked() if e.get("topic") == self.topic and "line" in e]
            for e in acked:
                entry = (p.nick, self.typed[p.nick][e["line"] - 1])
                assert log.setdefault(e["seq"], entry) == entry, f"{p.nick}'s ack of {e}"
            assert len(seqs) == len(set(seqs)), f"{p.nick} got a message twice"
            assert seqs == sorted(seqs), f"{p.nick} got messages out of order"
            mine = {e["seq"] for e in acked}
            seen = set(seqs) | mine
            gaps = set(range(min(seen), max(seen) + 1)) - seen
            assert not gaps, f"{p.nick} missed seqs {sorted(gaps)[:20]}"
        texts = [text for _, text in log.values()]
        assert len(texts) == len(set(texts)), "a line was committed twice"
        typed = {t for ts in self.typed.values() for t in ts}
        assert typed <= set(texts), f"lost: {sorted(typed - set(texts))[:20]}"
        return log


def test_a_host_killed_whole_loses_nothing_and_comes_back(lab: Lab) -> None:
    doomed = lab.sequencer("general")
    assert doomed is not None
    people = [person(lab, f"k{h.index}", h.index) for h in lab.hosts]
    chat = Chatter(people, "general")
    # Someone on the doomed host who does not come back (nc-like: one door, no retry).
    quitter = LineClientProcess(doomed.door, "quitter", netns=lab.clients, reconnect_for=0)
    try:
        quitter.join("general")
        for p in people:
            p.join("general")
        for n in range(60):
            chat.round(n)
            time.sleep(0.05)
            if n == 20:
                assert lab.kill_host(doomed) > 0
        chat.settle()
        chat.check()
        # Those who did not come back left, for everyone; their sessions wait to resume.
        watcher = people[0 if doomed.index else 1]
        watcher.wait_event(type="presence", nick="quitter", event="left",
                           reason="connection lost")
        watcher.type("/who")
        who = watcher.wait_event(type="who", topic="general")
        assert "quitter" not in who["members"] and len(who["members"]) == 3
        # Its topic has a sequencer on a survivor; its person was moved there.
        after = lab.sequencer("general")
        assert after is not None and after is not doomed
        moved = people[doomed.index]
        assert "resumed session" in moved.notes()
        # Back: the host rejoins, and someone who connects to it talks with the others.
        lab.restart_host(doomed)
        hosts = [h["host"] for h in lab.cluster_view()["hosts"]]
        assert sorted(hosts) == sorted(h.name for h in lab.hosts)
        back = LineClientProcess(doomed.door, "backagain", netns=lab.clients)
        try:
            back.join("general")
            back.type("I am back")
            people[0 if doomed.index else 1].wait(
                lambda evs: "I am back" in [e.get("text") for e in evs], "the returner")
        finally:
            back.kill()
    finally:
        quitter.kill()
        for p in people:
            p.kill()


def test_a_host_cut_off_commits_nothing_sends_its_people_away_and_rejoins(lab: Lab) -> None:
    cut = lab.sequencer("general")
    assert cut is not None
    people = [person(lab, f"p{h.index}", h.index) for h in lab.hosts]
    chat = Chatter(people, "general")
    try:
        for p in people:
            p.join("general")
        for n in range(100):
            chat.round(n)
            time.sleep(0.05)
            if n == 20:
                lab.partition(cut)
        # Its person was told, closed, and resumed on the majority side.
        alone = people[cut.index]
        alone.wait_event(type="notice", timeout=20,
                         text="this host lost the cluster; reconnect to another host "
                              "(theychat chat does it by itself)")
        chat.settle()
        chat.check()
        after = lab.sequencer("general")
        assert after is not None and after is not cut
        assert "resumed session" in alone.notes()
        lab.heal(cut)
        deadline = time.monotonic() + 30
        while sorted(h["host"] for h in lab.cluster_view()["hosts"]) != ["h0", "h1", "h2"]:
            assert time.monotonic() < deadline, "the healed host did not rejoin"
            time.sleep(0.5)
        back = LineClientProcess(cut.door, "healed", netns=lab.clients)
        try:
            back.join("general", timeout=20)
            back.type("after the heal")
            people[0 if cut.index else 1].wait(
                lambda evs: "after the heal" in [e.get("text") for e in evs], "the healed")
        finally:
            back.kill()
    finally:
        for p in people:
            p.kill()


def test_a_hung_sequencer_and_a_killed_router_are_restarted_on_their_host_without_an_election(
        lab: Lab) -> None:
    """Local failures stay local (point 9): the host's other root beats for it while its
    router restarts, its lease outlives a server's restart, and a follower's server
    killed gives its members, once back, what was committed meanwhile."""
    import os
    import signal

    host = lab.sequencer("general")
    assert host is not None
    pid = int(json_of(host.state / "run" / "server@general.pid")["pid"])
    router = int(json_of(host.state / "run" / "router.pid")["pid"])
    follower = next(h for h in lab.hosts if h is not host)
    follower_pid = int(json_of(follower.state / "run" / "server@general.pid")["pid"])
    since = time.time()  # the lab is the module's: earlier tests' faults are in its logs
    people = [person(lab, f"s{h.index}", h.index) for h in lab.hosts]
    chat = Chatter(people, "general")

    def elections() -> int:
        return sum(1 for h in lab.hosts for e in h.events("server@general")
                   if e["event"] == "sequencer_elected")

    try:
        for p in people:
            p.join("general")
        before = elections()
        for n in range(60):
            chat.round(n)
            time.sleep(0.05)
            if n == 20:
                os.kill(pid, signal.SIGSTOP)
            if n == 40:
                os.kill(router, signal.SIGKILL)
            if n == 30:  # a follower's server: what is committed while it restarts
                os.kill(follower_pid, signal.SIGKILL)  # reaches its members all the same
        chat.settle()
        chat.check()
        assert lab.sequencer("general") is host  # no election: its host kept the lease
        resumed = {p.nick: p.notes() for p in people if "resumed session" in p.notes()}
        assert not resumed  # a pause, not a disconnect
        assert elections() == before
        restarted = [e for e in host.events("server@general") if e["event"] == "daemon_started"
                     and e["pid"] != pid]
        assert restarted, "the hung server was not replaced"
        assert any(e["event"] == "daemon_started" and e["pid"] != router
                   for e in host.events("router")), "the killed router was not replaced"
        verdicts = [e for h in lab.hosts for e in h.events("router")
                    if e["event"] in ("host_suspected", "host_declared_dead")
                    and datetime.fromisoformat(e["ts"]).timestamp() > since]
        assert verdicts == []
    finally:
        for p in people:
            p.kill()


def json_of(path: object) -> dict:  # type: ignore[type-arg]
    import json
    from pathlib import Path

    return json.loads(Path(str(path)).read_text())  # type: ignore[no-any-return]
