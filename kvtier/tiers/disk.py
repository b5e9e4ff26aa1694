"""Spans in an LMDB file, each span its own record (checksummed), keyed by its uid. Writes run on a background thread,
a batch of spans per transaction; a span counts as on disk only once the transaction holding it has committed. The
same store reads a saved cache's spans (read-only).

One span per record, because py-lmdb touches every page of a value it returns: a read must fetch only the span it
asks for. A spilled span is read back by one pread of exactly its record, at the place the writer noted after the
commit (kvtier.tiers.lmdb_pages), with LMDB's readahead off: a page fault in LMDB's map would read the device's whole
read-ahead window. (Measured in benchmarks/RESULTS.md, sections 9b, 9c and 10.)"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import lmdb
import numpy as np
import torch

from kvtier import records
from kvtier.buffers import GrowableArray
from kvtier.errors import CacheWriteError, CorruptCacheError, TierFullError
from kvtier.tiers.base import entries
from kvtier.tiers.lmdb_pages import file_offset

INITIAL_MAP_BYTES = 64 * 2**20
# spans handed to the writer and not yet committed, before put() waits: one batch of the placement's victims (at most
# 2 x placement.HEADROOM_BYTES) is queued whole and the caller goes on
MAX_PENDING_BYTES = 2 * 2**30
WRITE_BATCH_BYTES = 64 * 2**20  # spans written in one transaction (encoded by one task), at most this many bytes
ENCODERS = 2  # threads encoding records ahead of the writer (zlib's crc32 runs without the GIL)
READERS = 8  # threads reading spilled spans, one pread each: several disk reads in flight at once


def span_key(uid: int) -> bytes:
    """The key of span uid's record."""
    return b"S" + int(uid).to_bytes(8, "big")


def grow_map(env: lmdb.Environment, needed: int = 0) -> None:
    """Double the memory map (at least to `needed` bytes more than it is); no transaction may be open."""
    size = env.info()["map_size"]
    env.set_mapsize(max(2 * size, size + needed))


def put_records(env: lmdb.Environment, items: list[tuple[bytes, bytes]], resize_lock: threading.Lock) -> None:
    """Write key/value records in one transaction, growing the map (under `resize_lock`, which readers hold while
    their transactions are open) until it fits."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            with resize_lock:
                grow_map(env, sum(len(v) for _, v in items))


_SAVED: dict[tuple[int, int], list] = {}  # (device, inode) of a saved cache file -> [read-only env, users]
_SAVED_LOCK = threading.Lock()


def open_saved(path: Path) -> lmdb.Environment:
    """A read-only environment on a saved cache file, shared by every cache of this process that reads it (LMDB
    refuses to open one file twice in a process); give it back with release_saved. A file shorter than LMDB's own
    header says (a truncated copy) is refused here: reading past its end would kill the process with SIGBUS."""
    status = path.stat()
    key = (status.st_dev, status.st_ino)
    with _SAVED_LOCK:
        if key in _SAVED:
            _SAVED[key][1] += 1
            return _SAVED[key][0]
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        if needed > status.st_size:
            env.close()
            raise CorruptCacheError(f"{str(path)!r} is truncated: {status.st_size} bytes where LMDB expects {needed}")
        _SAVED[key] = [env, 1]
        return env


def release_saved(env: lmdb.Environment) -> None:
    with _SAVED_LOCK:
        for key, entry in list(_SAVED.items()):
            if entry[0] is env:
                entry[1] -= 1
                if not entry[1]:
                    del _SAVED[key]
                    env.close()


def encode_each(uids: np.ndarray, spans: torch.Tensor) -> list[tuple[bytes, bytes]]:
    """Spans [N, 2, Hkv, S, D] on the host -> (key, record) per span."""
    return [(span_key(uid), records.encode_tensor(spans[row])) for row, uid in enumerate(uids.tolist())]


class LmdbStore:
    """Spans by uid in one LMDB file, a SpanStore: `spill(directory)` makes a scratch file, written in the background
    and removed on close; `saved(env, ...)` reads a saved cache's spans 0..count-1, read-only."""

    def __init__(self, env: lmdb.Environment, path: Path, span_shape, dtype, budget: int | None, scratch: bool):
        self.env, self.path, self.scratch = env, path, scratch
        self.span_shape, self.dtype = tuple(span_shape), dtype
        self.span_bytes = int(np.prod(span_shape)) * dtype.itemsize
        self.budget = budget
        self._held_bytes = 0  # bytes of live spans written or queued
        self.committed = GrowableArray(np.bool_, False)  # per uid: its record is committed
        self.offset_of = GrowableArray(np.int64, -1)  # per uid: where its record lies in the spill file (-1: unknown)
        self.length_of = GrowableArray(np.int64, 0)  # ... and its length
        self._env_lock = threading.Lock()  # readers vs. map resizes
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-disk") if scratch else None
        # records are encoded (checksums, one contiguous value) ahead of the writer, which puts them in queue order:
        # encoding and LMDB's copy into its map each keep a core busy, so they run side by side
        self._encoder = ThreadPoolExecutor(max_workers=ENCODERS, thread_name_prefix="kvtier-encode") if scratch else None
        self._inflight: list[tuple[Future, np.ndarray, int]] = []
        self._done: list[np.ndarray] = []
        self._file = os.open(path, os.O_RDONLY) if scratch else None  # read with pread, no read-ahead
        if self._file is not None and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file, 0, 0, os.POSIX_FADV_RANDOM)
        self._readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="kvtier-read") if scratch else None
        self.wait_s = 0.0
        self._closed = False

    @classmethod
    def spill(cls, directory: str | Path, span_shape, dtype, budget: int | None) -> "LmdbStore":
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix="kvtier-spill-", suffix=".lmdb", dir=directory)
            os.close(handle)
            env = lmdb.open(name, subdir=False, map_size=INITIAL_MAP_BYTES, sync=False, metasync=False, readahead=False)
        except (OSError, lmdb.Error) as err:
            raise CacheWriteError(f"disk_path {str(directory)!r} is not a writable directory ({err}); set disk_path to one that is") from None
        return cls(env, Path(name), span_shape, dtype, budget, scratch=True)

    @classmethod
    def saved(cls, env: lmdb.Environment, path: Path, span_shape, dtype, count: int) -> "LmdbStore":
        """A saved cache's spans 0..count-1, read-only."""
        store = cls(env, path, span_shape, dtype, None, scratch=False)
        store.committed.ensure(count)
        store.committed.data[:count] = True
        store._held_bytes = count * store.span_bytes
        return store

    # ---- writing (background thread) ---------------------------------------------------------------------------
    def put(self, uids: np.ndarray, spans: torch.Tensor) -> None:
        """Queue spans [N, 2, Hkv, S, D] (a CPU tensor the store now owns) for writing; returns at once."""
        if not self.scratch:
            raise CacheWriteError(f"{self.path} is a saved cache, opened read-only")
        size = len(uids) * self.span_bytes
        if self.budget is not None and self._held_bytes + size > self.budget:
            raise TierFullError(
                f"the disk tier is full: disk_budget={self.budget} bytes already holds {self._held_bytes} bytes of "
                f"spans; raise disk_budget (or gpu_budget / host_budget)"
            )
        self._held_bytes += size
        while sum(pending for _, _, pending in self._inflight) > MAX_PENDING_BYTES:
            self._wait_oldest()
        per_batch = max(1, WRITE_BATCH_BYTES // self.span_bytes)
        for start in range(0, len(uids), per_batch):
            part = uids[start : start + per_batch].copy()
            self.committed.ensure(int(part.max()) + 1)
            encoded = self._encoder.submit(encode_each, part, spans[start : start + per_batch])
            future = self._writer.submit(self._write, encoded)
            self._inflight.append((future, part, len(part) * self.span_bytes))

    def _write(self, encoded: Future) -> np.ndarray:
        """Put one batch of records in one transaction -> where each lies in the file [N, 2] (offset, length; offset
        -1 where LMDB gives it no fixed place), for reads by pread."""
        items = encoded.result()
        try:
            put_records(self.env, items, self._env_lock)
        except lmdb.Error as err:
            raise CacheWriteError(f"writing spilled spans to {self.path} failed ({err}); free disk space or move disk_path") from None
        places = np.full((len(items), 2), -1, dtype=np.int64)
        page_size = self.env.stat()["psize"]
        with self.env.begin(buffers=True) as txn:  # the records' pages were just written: in the page cache
            for row, (key, value) in enumerate(items):
                offset = file_offset(txn.get(key), page_size)
                if offset is not None and os.pread(self._file, 16, offset) == bytes(value[:16]):
                    places[row] = offset, len(value)
        return places

    def _wait_oldest(self) -> None:
        future, uids, _ = self._inflight.pop(0)
        start = time.perf_counter()
        places = future.result()  # re-raises the writer's CacheWriteError here, on the caller's thread
        self.wait_s += time.perf_counter() - start
        if len(uids):
            for array in (self.offset_of, self.length_of):
                array.ensure(int(uids.max()) + 1)
            self.offset_of.data[uids], self.length_of.data[uids] = places[:, 0], places[:, 1]
            self.committed.data[uids] = True
            self._done.append(uids)

    def poll(self) -> np.ndarray:
        """uids whose records committed since the last poll."""
        while self._inflight and self._inflight[0][0].done():
            self._wait_oldest()
        done, self._done = self._done, []
        return np.concatenate(done) if done else np.empty(0, dtype=np.int64)

    def wait_any(self) -> np.ndarray:
        """Block until the oldest queued write committed -> uids committed since the last poll."""
        if self._inflight:
            self._wait_oldest()
        return self.poll()

    def pending(self) -> int:
        return len(self._inflight)

    # ---- reading -------------------------------------------------------------------------------------------------
    def get_into(self, uids: np.ndarray, out: torch.Tensor) -> None:
        """Read committed spans into out [N, 2, Hkv, S, D] (a contiguous CPU tensor), verifying each span: those whose
        place in the file is known by pread on the reader threads, the rest through an LMDB read transaction."""
        start = time.perf_counter()
        self.offset_of.ensure(int(uids.max()) + 1 if len(uids) else 0)
        placed = np.flatnonzero(self.offset_of.data[uids] >= 0)
        groups = np.array_split(placed, min(READERS, len(placed))) if len(placed) else []
        reads = [self._readers.submit(self._pread_into, uids[group], out, group) for group in groups]
        others = np.setdiff1d(np.arange(len(uids)), placed, assume_unique=True)
        if len(others):
            self._txn_read_into(uids, out, others)
        for read in reads:
            read.result()
        self.wait_s += time.perf_counter() - start

    def _pread_into(self, uids: np.ndarray, out: torch.Tensor, positions: np.ndarray) -> None:
        """Spans uids [M] (placed in the file) -> out[positions] [M, 2, Hkv, S, D], one preadv of its record each:
        the header into a small buffer, the span straight into its row of out."""
        for uid, position in zip(uids.tolist(), positions.tolist()):
            name = self._record_name(uid)
            head = bytearray(int(self.length_of.data[uid]) - self.span_bytes)  # the record's prefix and header
            target = records.tensor_payload(out[position])  # the span's bytes land in place
            if os.preadv(self._file, [head, target], int(self.offset_of.data[uid])) != len(head) + len(target):
                raise CorruptCacheError(f"record {name!r} is cut short (the spill file was truncated)")
            records.check_tensor(records.unpack_header(head, len(target), name), out[position], name)

    def _txn_read_into(self, uids: np.ndarray, out: torch.Tensor, positions: np.ndarray) -> None:
        """Spans uids[positions] -> out[positions] through one LMDB read transaction."""
        with self._env_lock, self.env.begin(buffers=True) as txn:
            for position in positions.tolist():
                uid = int(uids[position])
                value = txn.get(span_key(uid))
                if value is None:
                    raise CorruptCacheError(f"{self.path.name}: the record of span {uid} is missing")
                records.decode_tensor_into(value, out[position], self._record_name(uid))

    def _record_name(self, uid: int) -> str:
        return f"{self.path.name}: span {uid} (record {uid})"

    def contains(self, uid: int) -> bool:
        return uid < len(self.committed.data) and bool(self.committed.data[uid])

    def holds(self, uids: np.ndarray) -> np.ndarray:
        return entries(self.committed, uids)

    def evict(self, uids: np.ndarray) -> None:
        """Forget committed spans (their copy above is kept): the writer thread deletes their records, in order with
        its writes."""
        self.committed.data[uids] = False
        self.offset_of.data[uids] = -1  # LMDB may reuse the pages once the record is deleted
        self._held_bytes -= len(uids) * self.span_bytes
        future = self._writer.submit(self._delete, uids.tolist())
        self._inflight.append((future, np.empty(0, dtype=np.int64), 0))

    def _delete(self, doomed: list[int]) -> None:
        with self.env.begin(write=True) as txn:
            for uid in doomed:
                txn.delete(span_key(uid))

    @property
    def nbytes(self) -> int:
        return self._held_bytes

    def close(self) -> None:
        """Finish the writes, close the file (a saved one: give back this store's use of the shared handle) and
        delete a spill file. Closing twice (close(), then the placement's finalizer) does nothing the second time."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._encoder.shutdown(wait=True)
            self._readers.shutdown(wait=True)
            os.close(self._file)
            self._writer = self._encoder = self._readers = None
        self._inflight.clear()
        if not self.scratch:
            release_saved(self.env)
            return
        self.env.close()
        for path in (self.path, Path(str(self.path) + "-lock")):
            path.unlink(missing_ok=True)
