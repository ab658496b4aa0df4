"""A full disk under a real tree, on a small tmpfs this test mounts (root only).

A topic server whose log cannot be written stops (fail-stop), and: the sender of every
line that was not acknowledged is told so, never met with silence; the members are told
the topic is paused; its monitor keeps restarting it (a full disk is not a crash loop to
give up on, however long it lasts); once there is room the topic serves again by itself;
nothing acknowledged is lost.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.process.conftest import Client, Tree, free_port, tear_down

FULL_FOR_S = 8.0  # longer than 5 restarts at the 1 s backoff: a counted loop would give up


@pytest.fixture
def small_disk() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    root = Path(tempfile.mkdtemp(prefix="tc-", dir="/tmp"))
    disk = root / "state"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs",
                          str(disk)], capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30,
                       check=False)
        shutil.rmtree(root, ignore_errors=True)


def fill(path: Path) -> None:
    """Take every byte the filesystem has left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


def collect(c: Client, until: float, last_text: str | None = None) -> list[dict[str, Any]]:
    """Events until the deadline, or up to the one whose text is `last_text`."""
    out = []
    while (line := c._read_line(until)) is not None:
        out.append(json.loads(line))
        if last_text is not None and out[-1].get("text") == last_text:
            break
    return out


def test_a_full_disk_pauses_a_topic_which_comes_back_by_itself(small_disk: Path) -> None:
    port = free_port()
    config = small_disk.parent / "theychat.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(small_disk), "listen": {"port": port}, "topics": ["rust"],
        "history": {"on_join": 0}}))
    tree = Tree(config, small_disk, port)
    try:
        res = tree.cli("up")
        assert res.returncode == 0, res.stderr
        ann, bob = Client(port, "ann", json_mode=True), Client(port, "bob", json_mode=True)
        for c in (ann, bob):
            c.send("/join rust")
            c.expect_json(type="joined")
        ann.send("before")
        assert ann.expect_json(type="sent")["seq"] == 1
        filler = small_disk / "filler"
        fill(filler)
        # What still fits in the log's last page is taken; then a line is refused.
        acked, texts = [1], ["before"]
        for i in range(500):
            ann.send(f"fill {i}")
            answer = json.loads(ann.expect(r'"type":"(sent|error)"'))
            if answer["type"] == "error":
                break
            acked.append(answer["seq"])
            texts.append(f"fill {i}")
        else:
            raise AssertionError("the log never ran out of room")
        assert answer["code"] == "not_saved" and "not saved" in answer["text"]
        paused = bob.expect_json(type="notice")
        assert paused["text"].startswith("rust is paused: its server cannot write to disk")
        for i in range(3):  # the server is down: these wait in the kernel for it
            ann.send(f"waiting {i}")
        time.sleep(FULL_FOR_S)
        filler.unlink()
        before = collect(bob, time.monotonic() + 15, "waiting 2")  # back within this
        ann.send("after")
        got = collect(ann, time.monotonic() + 5, None)
        after = collect(bob, time.monotonic() + 5, "after")
        acked += [e["seq"] for e in got if e["type"] == "sent"]
        texts += ["waiting 0", "waiting 1", "waiting 2", "after"]
        # every line had its answer: all acknowledged, but the one refused; none twice
        assert len(acked) == len(texts) and len(set(acked)) == len(acked), got
        # first told it is back, then the lines that waited, then the new one
        shown = [e.get("text") for e in before + after if e["type"] in ("notice", "message")]
        assert shown[-5:] == ["rust is back: what you send is taken again", *texts[-4:]]
        rows = tree.wait_healthy()
        assert all(r["state"] == "ready" for r in rows)
        monitor = tree.log_events("server-monitor@rust")
        assert not [e for e in monitor if e["event"] == "gave_up"]
        assert [e for e in monitor if e["event"] == "restarted"]
        waits = [e for e in monitor if e["event"] == "restarting" and e["cause"] == "no_space"]
        assert len(waits) > 5  # more than the restart intensity allows a crash loop
        # the history that was acknowledged is all there
        bob.send("/history 1000")
        history = bob.expect_json(type="history")
        assert [m["text"] for m in history["messages"]] == texts
        assert [m["seq"] for m in history["messages"]] == acked
    except BaseException:
        (small_disk / "filler").unlink(missing_ok=True)
        print("\n".join(str(e) for e in tree.log_events("server@rust")[-30:]))
        raise
    finally:
        with contextlib.suppress(Exception):
            (small_disk / "filler").unlink()
        tear_down(tree)
