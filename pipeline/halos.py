"""Chunks that neighbouring reads share through their halos, decoded once for all of a
worker's reader processes.

A read (a batch's part, :func:`pipeline.windows.part_slices`: a column of a batch's block of
tiles) reaches ``halo`` pixels past its tiles' cores, so the chunks along an edge between two
reads are read by both (by four at a corner). Reader processes keep no chunk from one read to
the next (:func:`pipeline.reading._read_into`), so each of those would be decoded once per read:
1.27 times per chunk of a 4096^2 scene with 256-pixel blocks in whole batches of 8 x 8 tiles of
256, 1.41 times at 8192^2, 1.56 times with 512-pixel blocks; about three times in columns of
8 tiles, each reaching into the chunk columns on either side. With a :class:`ChunkStore`
(an anonymous file of the worker's, which its readers open through ``/proc``; one per planned
input, from its first batch until the input is forgotten: :class:`ChunkStores`) the first
reader to need such a chunk decodes it into the store, the others copy it from there, and the
last of the reads that need it frees its memory.

The file starts with a record per chunk: how many reads of the plan need it
(:func:`pipeline.chunks.chunk_users`), how many have yet to, and whether it is stored. The
stored chunks follow, each in a slot of its own, so the file is sparse. A chunk's record and
slot change only under a lock of its byte (``lockf``), and its producer holds that lock while it
decodes, so a reader that needs the chunk meanwhile waits for it rather than decoding it too.
The kernel drops a dead reader's locks; a chunk it was decoding is left unstored, and the next
reader to need it decodes it. At most ``budget`` bytes are stored at once; past that, each
read decodes its chunks as before, so memory does not grow with the scene.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import functools
import logging
import os
import struct
import threading
from collections.abc import Callable, Hashable, Iterator

import numpy as np

from pipeline.chunks import Chunk, ChunkUsers

LOG = logging.getLogger(__name__)

BUDGET = 96 * 2**20
"""Most bytes of chunks a store holds at once: the edges between the batches of a band of
batches 8192 px wide (4 uint16 bands), their halos across the next band, and the chunks that
the parts of the batches in flight share. At 48 MB, 4 threads reading their batches in 4 parts
each decoded 1.15-1.23 times per chunk of an 8192^2 scene; at 96 MB, 1.00 times, in the same
peak memory."""

MAGIC = b"tpchunk1"
_HEAD = struct.Struct("=8s32sii")  # magic, key (32 bytes), chunk rows, chunk columns
_STORED = _HEAD.size  # int64: bytes stored now
_RECORDS = _STORED + 8
_RECORD = struct.Struct("=iii")  # reads that need it, those yet to, whether it is stored (0/1)
_PAGE = 4096


def _data_offset(count: int) -> int:
    """Where the slots start, after ``count`` records, on a page boundary."""
    return -(-(_RECORDS + count * _RECORD.size) // _PAGE) * _PAGE


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """The C library's ``fallocate`` (to punch holes), None where there is none."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).fallocate
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
    return function


_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _punch(fd: int, offset: int, size: int) -> None:
    """Give back the memory of ``size`` bytes at ``offset``; they read as zeros afterwards."""
    function = _fallocate()
    if function is None or function(fd, _PUNCH_HOLE, offset, size) != 0:
        code = ctypes.get_errno() if function is not None else errno.ENOSYS
        raise OSError(code, os.strerror(code))


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkStore:
    """The worker's side: the store of one planned input's shared chunks, made empty with
    its plan's :class:`~pipeline.chunks.ChunkUsers`; readers open it by :attr:`path`."""

    fd: int
    key: str

    @classmethod
    def create(cls, key: str, users: ChunkUsers) -> ChunkStore:
        """A new store; OSError where this system has no anonymous files or cannot punch holes
        in them (its memory could not be given back)."""
        if not hasattr(os, "memfd_create"):
            raise OSError(errno.ENOSYS, "no memfd_create on this system")
        fd = os.memfd_create("tilepipe-chunks", os.MFD_CLOEXEC)
        try:
            counts = users.array().ravel()
            records = np.zeros((counts.size, 3), np.int32)
            records[:, 0] = records[:, 1] = counts
            head = _HEAD.pack(MAGIC, _key_bytes(key), *users.shape) + struct.pack("=q", 0)
            os.pwrite(fd, head + records.tobytes(), 0)
            offset = _data_offset(counts.size)
            os.ftruncate(fd, offset + _PAGE)
            _punch(fd, offset, _PAGE)  # holes can be punched here, or no store
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, key)

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def stored_bytes(self) -> int:
        """Bytes of chunks held now."""
        return _stored(self.fd)

    def close(self) -> None:
        """Close it here; its memory goes when no reader has it open."""
        os.close(self.fd)


@dataclasses.dataclass
class _Open:
    """A store a worker holds: how many of its input's batches are being read, and whether
    the input is forgotten (the store closes once both say so)."""

    store: ChunkStore
    reading: int = 0
    forgotten: bool = False


class ChunkStores:
    """A worker's :class:`ChunkStore` for each planned input its readers read: made by the
    input's first batch, kept while any batch of it is read and until the input is forgotten;
    one forgotten is not made again (a batch of it may still be running)."""

    FORGOTTEN = 4096
    """Inputs remembered as forgotten."""

    def __init__(self) -> None:
        self._open: dict[Hashable, _Open] = {}
        self._forgotten: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.unavailable: str | None = None
        """Why this process has no stores, once it could not make one."""

    @contextlib.contextmanager
    def lend(self, key: Hashable, users: ChunkUsers | None) -> Iterator[str | None]:
        """The path of ``key``'s store for the with-block; None where there is none to share
        (no key or plan, no chunk read twice, or no store can be had here)."""
        held = self._acquire(key, users)
        try:
            yield None if held is None else held.store.path
        finally:
            if held is not None:
                with self._lock:
                    held.reading -= 1
                    self._close_if_done(key, held)

    def forget(self, key: Hashable) -> None:
        """``key``'s input will not be read again: its store closes once no batch of it is read."""
        with self._lock:
            self._forgotten[key] = None
            while len(self._forgotten) > self.FORGOTTEN:
                self._forgotten.popitem(last=False)
            held = self._open.get(key)
            if held is not None:
                held.forgotten = True
                self._close_if_done(key, held)

    def clear(self) -> None:
        """Forget every input (the end of a run)."""
        with self._lock:
            keys = list(self._open)
        for key in keys:
            self.forget(key)

    def stored(self, key: Hashable) -> int | None:
        """Bytes of chunks ``key``'s store holds now (None: it has none open)."""
        with self._lock:
            held = self._open.get(key)
            return None if held is None else held.store.stored_bytes()

    def __len__(self) -> int:
        """Stores open now."""
        return len(self._open)

    def _acquire(self, key: Hashable, users: ChunkUsers | None) -> _Open | None:
        if not isinstance(key, str) or users is None or self.unavailable is not None:
            return None
        with self._lock:
            held = self._open.get(key)
            if held is None:
                if key in self._forgotten or not users.shared:
                    return None
                try:
                    held = self._open[key] = _Open(ChunkStore.create(key, users))
                except OSError as exc:
                    self.unavailable = str(exc)
                    LOG.warning("no store of shared chunks here (%s): each batch decodes its own", exc)
                    return None
            held.reading += 1
            return held

    def _close_if_done(self, key: Hashable, held: _Open) -> None:
        if held.forgotten and held.reading == 0:
            del self._open[key]
            held.store.close()


def _stored(fd: int) -> int:
    """Bytes of chunks the store ``fd`` holds (its slots' bytes)."""
    return struct.unpack("=q", os.pread(fd, 8, _STORED))[0]


def _key_bytes(key: str) -> bytes:
    return key.encode()[:32].ljust(32, b"\0")


class SharedChunks:
    """A reader's side of a :class:`ChunkStore`, for one read: :meth:`get` a chunk from it,
    or decode it (into it, where other reads need it too)."""

    def __init__(self, fd: int, shape: tuple[int, int], users: np.ndarray, budget: int):
        self.fd, self.shape, self.users, self.budget = fd, shape, users, budget
        self.decoded = self.copied = 0
        self._data = _data_offset(users.size)

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str | None, key: str, budget: int = BUDGET) -> Iterator[SharedChunks | None]:
        """The store at ``path`` for the with-block, if it is ``key``'s; None otherwise (no
        store, or not that one: each read then decodes its chunks)."""
        try:
            fd = os.open(path, os.O_RDWR) if path is not None else None
        except OSError:
            fd = None
        if fd is None:
            yield None
            return
        try:
            head = os.pread(fd, _HEAD.size, 0)
            magic, owner, rows, cols = _HEAD.unpack(head) if len(head) == _HEAD.size else (None, None, 0, 0)
            if (magic, owner) != (MAGIC, _key_bytes(key)):
                yield None
                return
            records = np.frombuffer(os.pread(fd, rows * cols * _RECORD.size, _RECORDS), np.int32)
            yield cls(fd, (rows, cols), records.reshape(rows * cols, 3)[:, 0].copy(), budget)
        finally:
            os.close(fd)  # and with it every lock this process held on it

    def get(self, i: int, j: int, slot_bytes: int, decode: Callable[[], Chunk], empty: Callable[[], Chunk]) -> Chunk:
        """Chunk ``(i, j)``: copied (into ``empty()``, a chunk of its shape and dtypes) from the
        store where another read stored it, else ``decode()``-d, and stored for the reads
        still to read it where there is room (``slot_bytes``: a slot's size, the most any chunk
        of this input takes)."""
        c = i * self.shape[1] + j
        if self.users[c] < 2:
            self.decoded += 1
            return decode()
        with self._locked(c):
            _, left, stored = _RECORD.unpack(os.pread(self.fd, _RECORD.size, self._record(c)))
            if stored:
                chunk = self._copy(c, slot_bytes, empty())
                left -= 1
                if left <= 0:
                    self._free(c, slot_bytes)
                self._set(c, max(left, 0), int(left > 0))
                self.copied += 1
                return chunk
            if left >= 2 and self._add_stored(slot_bytes, self.budget):
                try:
                    chunk = decode()  # the others wait for it on this lock
                except BaseException:
                    self._add_stored(-slot_bytes)
                    raise
                self.decoded += 1
                try:
                    self._write(c, slot_bytes, chunk)
                except OSError:  # not stored after all: the others decode their own
                    with contextlib.suppress(OSError):
                        _punch(self.fd, self._data + c * slot_bytes, slot_bytes)  # what was written of it
                    self._add_stored(-slot_bytes)
                    self._set(c, left - 1, 0)
                    return chunk
                self._set(c, left - 1, 1)
                return chunk
            self._set(c, max(left - 1, 0), 0)
        self.decoded += 1
        return decode()

    def stored_bytes(self) -> int:
        """Bytes of chunks the store holds now."""
        return _stored(self.fd)

    def _record(self, c: int) -> int:
        return _RECORDS + c * _RECORD.size

    def _set(self, c: int, left: int, stored: int) -> None:
        os.pwrite(self.fd, struct.pack("=ii", left, stored), self._record(c) + 4)

    @contextlib.contextmanager
    def _locked(self, byte: int) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, byte)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, byte)

    def _add_stored(self, size: int, limit: int | None = None) -> bool:
        """Count ``size`` more bytes as stored, unless that would pass ``limit``."""
        with self._locked(self.users.size):
            stored = _stored(self.fd)
            if limit is not None and stored + size > limit:
                return False
            os.pwrite(self.fd, struct.pack("=q", stored + size), _STORED)
            return True

    def _write(self, c: int, slot_bytes: int, chunk: Chunk) -> None:
        arrays = [np.ascontiguousarray(chunk.values)]
        if chunk.masks is not None:
            arrays.append(np.ascontiguousarray(chunk.masks))
        if chunk.nbytes > slot_bytes or os.pwritev(self.fd, arrays, self._data + c * slot_bytes) != chunk.nbytes:
            raise OSError(errno.EIO, "a chunk did not fit its slot of the store")

    def _copy(self, c: int, slot_bytes: int, chunk: Chunk) -> Chunk:
        arrays = [chunk.values] if chunk.masks is None else [chunk.values, chunk.masks]
        if chunk.nbytes > slot_bytes or os.preadv(self.fd, arrays, self._data + c * slot_bytes) != chunk.nbytes:
            raise OSError(errno.EIO, "a chunk was read short from the store")
        return chunk

    def _free(self, c: int, slot_bytes: int) -> None:
        _punch(self.fd, self._data + c * slot_bytes, slot_bytes)
        self._add_stored(-slot_bytes)
