"""The last sequence number a server fanned out, kept in a shared memory map, and
whether the topic is paused for want of disk space.

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

_FIELD = struct.Struct("<Q")
SEQ, PAUSED = 0, _FIELD.size  # offsets: the seq fanned out; 1 while paused
SIZE = 2 * _FIELD.size


class Watermark:
    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)

    def get(self) -> int:
        return int(_FIELD.unpack_from(self._map, SEQ)[0])

    def set(self, seq: int) -> None:
        _FIELD.pack_into(self._map, SEQ, seq)

    @property
    def paused(self) -> bool:
        """A server stopped for a full disk and its members were told; writing this
        needs no disk space (the file's page is there already)."""
        return bool(_FIELD.unpack_from(self._map, PAUSED)[0])

    @paused.setter
    def paused(self, value: bool) -> None:
        _FIELD.pack_into(self._map, PAUSED, int(value))

    def close(self) -> None:
        self._map.close()
