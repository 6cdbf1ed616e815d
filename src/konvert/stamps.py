"""Write stamps shared by the processes of one host: how a worker learns, without a round trip,
that another worker changed a member's balance.

A table of 2**20 64-bit slots in shared memory; a member maps to one slot by a CRC of its id.
A write, after its commit and its Redis invalidation and before its response, puts a value in
the member's slot that no process wrote there before. A worker that keeps a balance in memory
(:class:`konvert.cache.NearCache`) remembers the slot's value from before it fetched the
balance, and serves the balance only while the slot still holds that value. A client that got
the response to its write has therefore made every later read on this host miss, on any
worker. Members sharing a slot only cost each other a miss.

``konvert serve`` creates the file (in ``/dev/shm`` where there is one) and hands it to its
workers through ``KONVERT_STAMPS_FILE``. Without a file the table is private to the process.
8-byte aligned loads and stores are atomic on the 64-bit platforms konvert runs on.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import tempfile
import zlib

SLOTS = 1 << 20
_MASK = SLOTS - 1
SIZE_BYTES = SLOTS * 8


class Stamps:
    def __init__(self, path: str = "") -> None:
        if path:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < SIZE_BYTES:
                    os.ftruncate(fd, SIZE_BYTES)  # zero-filled; tmpfs allocates pages on first write
                self._map = mmap.mmap(fd, SIZE_BYTES)
            finally:
                os.close(fd)
        else:
            self._map = mmap.mmap(-1, SIZE_BYTES)
        self._slots = memoryview(self._map).cast("Q")
        # Values unique to this process: a random start, then counting up.
        self._next = random.getrandbits(62) | 1

    def read(self, member_id: str) -> int:
        return self._slots[zlib.crc32(member_id.encode()) & _MASK]

    def bump(self, member_id: str) -> None:
        self._next += 1
        self._slots[zlib.crc32(member_id.encode()) & _MASK] = self._next & 0xFFFF_FFFF_FFFF_FFFF

    def close(self) -> None:
        self._slots.release()
        self._map.close()


_FILE_PREFIX = "konvert-stamps-"


def create_file() -> str:
    """A new stamps file for the processes of one ``konvert serve``; the caller removes it.

    Its name carries the creator's pid, so that files left by a ``konvert serve`` that was
    killed (no chance to remove its own) are removed here once their creator is gone.
    """
    directory = (
        "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    )
    _remove_orphans(directory)
    fd, path = tempfile.mkstemp(prefix=f"{_FILE_PREFIX}{os.getpid()}-", dir=directory)
    try:
        os.ftruncate(fd, SIZE_BYTES)
    finally:
        os.close(fd)
    return path


def _remove_orphans(directory: str) -> None:
    try:
        names = [name for name in os.listdir(directory) if name.startswith(_FILE_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(_FILE_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
