"""The last sequence number a server fanned out, kept in a shared memory map.

A message is logged (fsync) and only then fanned out; a server that dies between the two
leaves logged messages its connected members never got. Stores into a shared mapping
land in the page cache at once and outlive the process (not a power cut, which also
takes the connections with it), so a restarted server knows exactly what to send.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

_FMT = struct.Struct("<Q")


class Watermark:
    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < _FMT.size:
                os.ftruncate(fd, _FMT.size)
            self._map = mmap.mmap(fd, _FMT.size)
        finally:
            os.close(fd)

    def get(self) -> int:
        return int(_FMT.unpack_from(self._map)[0])

    def set(self, seq: int) -> None:
        _FMT.pack_into(self._map, 0, seq)

    def close(self) -> None:
        self._map.close()
