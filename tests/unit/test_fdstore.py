"""The fd store: a monitor's vault answering through its control socket, and a worker's
keeper storing, dropping and fetching back real sockets (in one process, on a socket
in a temporary directory)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

from theychat.daemons import control, ops
from theychat.daemons.fdstore import FETCH_BATCH, FdKeeper, FdVault


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _add(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    info = warning = error = exception = _add


def run_with_vault(tmp_path: Path, body: Any) -> FdVault:
    vault = FdVault()

    async def main() -> None:
        path = tmp_path / "m.ctl"
        server = control.ControlServer(path, ops.Dispatcher("monitor", vault.table()), Log())
        await server.start()
        keeper = FdKeeper(path, Log())
        keeper.start()
        try:
            await body(vault, keeper)
        finally:
            await keeper.close()
            await server.close()

    asyncio.run(main())
    return vault


def test_stored_sockets_come_back_working_and_dropped_ones_do_not(tmp_path: Path) -> None:
    pairs = [socket.socketpair() for _ in range(FETCH_BATCH + 5)]  # more than one batch

    async def body(vault: FdVault, keeper: FdKeeper) -> None:
        for i, (ours, _) in enumerate(pairs):
            keeper.store(f"s{i:03d}", ours.fileno(), {"sid": f"s{i:03d}"})
        assert await keeper.settled(keeper.drop("s001"))
        assert await keeper.settled(keeper.store("s002", None, {"sid": "s002", "json": True}))
        assert len(vault) == len(pairs) - 1
        got = await keeper.fetch_all()
        assert [k for k, _, _ in got] == [f"s{i:03d}" for i in range(len(pairs)) if i != 1]
        meta = {k: m for k, _, m in got}
        assert meta["s002"] == {"sid": "s002", "json": True}  # the record changed, not the fd
        for key, fd, _ in got:  # each copy is the same connection as the original
            i = int(key[1:])
            with socket.socket(fileno=fd) as copy:
                copy.sendall(key.encode())
                assert pairs[i][1].recv(10) == key.encode()
        held = await control.request(tmp_path / "m.ctl", ops.FdHeld(id="s000").message())
        gone = await control.request(tmp_path / "m.ctl", ops.FdHeld(id="s001").message())
        assert held["held"] is True and gone["held"] is False

    vault = run_with_vault(tmp_path, body)
    vault.close_all()
    assert len(vault) == 0
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


def test_the_vault_owns_its_copies_and_closes_a_replaced_one(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()

    async def body(vault: FdVault, keeper: FdKeeper) -> None:
        await keeper.settled(keeper.store("x", a.fileno(), {"sid": "x"}))
        first = vault.entries["x"][0]
        await keeper.settled(keeper.store("x", c.fileno(), {"sid": "x"}))
        assert first is not None
        try:
            os.fstat(first)
            raise AssertionError("the replaced copy is still open")
        except OSError:
            pass
        vault.drop("x")
        assert "x" not in vault.entries

    run_with_vault(tmp_path, body)
    for s in (a, b, c, d):
        s.close()


def test_a_keeper_whose_monitor_is_gone_says_so_and_carries_on(tmp_path: Path) -> None:
    async def main() -> None:
        log = Log()
        keeper = FdKeeper(tmp_path / "nobody.ctl", log)
        keeper.start()
        a, b = socket.socketpair()
        assert await keeper.settled(keeper.store("x", a.fileno(), {"sid": "x"})) is False
        assert [e for e, _ in log.events] == ["fd_store_failed"]
        await keeper.close()
        a.close()
        b.close()

    asyncio.run(main())
