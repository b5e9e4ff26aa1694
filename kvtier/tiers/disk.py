"""The disk tier: spans in an LMDB file, each span its own record (checksummed). Writes run on a background thread,
a batch of spans per transaction; a span counts as on disk only once the transaction holding it has committed. The
same store reads a saved cache's spans (read-only; a file saved by an earlier version may hold several per record).

One span per record because py-lmdb touches every page of a value it returns (its `preload`, so that no page fault
is taken with the GIL held): reading one 128 KiB span from a 64 MiB record of 512 read all 64 MiB, and a decode step
of the 8B shape at 1M tokens, ~1,000 spans from disk, read ~450 GB in 321 s (RESULTS section 10). And a spilled span
is read back with one pread of exactly its record, at the place in the file the writer noted after the commit
(kvtier.tiers.lmdb_pages), several at once, with LMDB's readahead off: a page fault in LMDB's map reads the block
device's whole read-ahead window (8 MiB on the H200 machine), which a short page cache drops before it is used."""
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
from kvtier.tiers.lmdb_pages import file_offset

INITIAL_MAP_BYTES = 64 * 2**20
# spans handed to the writer and not yet committed, before put() waits: one batch of the placement's victims (at most
# 2 x placement.HEADROOM_BYTES) is queued whole and the caller goes on
MAX_PENDING_BYTES = 2 * 2**30
WRITE_BATCH_BYTES = 64 * 2**20  # spans written in one transaction (encoded by one task), at most this many bytes
SPANS_PER_RECORD = 1  # what this version writes (see above); a saved file's meta says what it holds
ENCODERS = 2  # threads encoding records ahead of the writer (zlib's crc32 runs without the GIL)
READERS = 8  # threads reading spilled spans, one pread each: several disk reads in flight at once


def batch_key(batch: int) -> bytes:
    return b"B" + int(batch).to_bytes(8, "big")


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
    """Spans [N, 2, Hkv, S, D] on the host -> (key, record) per span: span uid as record uid."""
    return [(batch_key(uid), records.encode_spans(spans[row : row + 1])) for row, uid in enumerate(uids.tolist())]


class LmdbStore:
    """Spans by uid in one LMDB file: uid -> (record, row). `spill(directory)` makes a scratch file removed on close,
    whose span u is record u; `archive(env, ...)` reads a saved cache, whose span u sits at row u % n of record u // n."""

    def __init__(self, env: lmdb.Environment, path: Path, span_shape, dtype, budget: int | None, scratch: bool):
        self.env, self.path, self.scratch = env, path, scratch
        self.span_shape, self.dtype = tuple(span_shape), dtype
        self.span_bytes = int(np.prod(span_shape)) * dtype.itemsize
        self.budget = budget
        self.record_bytes = 0  # bytes of live spans written or queued
        self.record_of = GrowableArray(np.int64, -1)  # per uid: its record ...
        self.row_of = GrowableArray(np.int64, -1)  # ... and its row there
        self.committed = GrowableArray(np.bool_, False)  # per uid: its record is committed
        self.offset_of = GrowableArray(np.int64, -1)  # per uid: where its record lies in the spill file (-1: unknown)
        self.length_of = GrowableArray(np.int64, 0)  # ... and its length
        self._env_lock = threading.Lock()  # readers vs. map resizes
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-disk") if scratch else None
        # records are encoded (checksums, one contiguous value) ahead of the writer, which puts them in queue order:
        # encoding and LMDB's copy into its map each run at ~0.8 GB/s on one core, overlapped they double the rate
        self._encoder = ThreadPoolExecutor(max_workers=ENCODERS, thread_name_prefix="kvtier-encode") if scratch else None
        self._inflight: list[tuple[Future, np.ndarray, int]] = []
        self._done: list[np.ndarray] = []
        self._file = os.open(path, os.O_RDONLY) if scratch else None  # read with pread, no read-ahead
        if self._file is not None and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file, 0, 0, os.POSIX_FADV_RANDOM)
        self._readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="kvtier-read") if scratch else None
        self.wait_s = 0.0

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
    def archive(cls, env: lmdb.Environment, path: Path, span_shape, dtype, uids: int, per_record: int) -> "LmdbStore":
        """A saved cache's spans 0..uids-1, `per_record` to a record, read-only."""
        store = cls(env, path, span_shape, dtype, None, scratch=False)
        for array in (store.record_of, store.row_of, store.committed):
            array.ensure(uids)
        store.record_of.data[:uids], store.row_of.data[:uids] = np.divmod(np.arange(uids), per_record)
        store.committed.data[:uids] = True
        return store

    # ---- writing (background thread) ---------------------------------------------------------------------------
    def put(self, uids: np.ndarray, spans: torch.Tensor) -> None:
        """Queue spans [N, 2, Hkv, S, D] (a CPU tensor the store now owns) for writing; returns at once."""
        if not self.scratch:
            raise CacheWriteError(f"{self.path} is a saved cache, opened read-only")
        size = len(uids) * self.span_bytes
        if self.budget is not None and self.record_bytes + size > self.budget:
            raise TierFullError(
                f"the disk tier is full: disk_budget={self.budget} bytes already holds {self.record_bytes} bytes of "
                f"spans; raise disk_budget (or gpu_budget / host_budget)"
            )
        self.record_bytes += size
        while sum(pending for _, _, pending in self._inflight) > MAX_PENDING_BYTES:
            self._wait_oldest()
        per_batch = max(1, WRITE_BATCH_BYTES // self.span_bytes)
        for start in range(0, len(uids), per_batch):
            part = uids[start : start + per_batch].copy()
            for array in (self.record_of, self.row_of, self.committed):
                array.ensure(int(part.max()) + 1)
            self.record_of.data[part], self.row_of.data[part] = part, 0
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
            name = f"{self.path.name}: span {uid} (record {uid})"
            head = bytearray(int(self.length_of.data[uid]) - self.span_bytes)  # the record's prefix and header
            target = records.tensor_payload(out[position])  # the span's bytes land in place
            if os.preadv(self._file, [head, target], int(self.offset_of.data[uid])) != len(head) + len(target):
                raise CorruptCacheError(f"record {name!r} is cut short (the spill file was truncated)")
            records.check_span(records.unpack_header(head, len(target), name), 0, out[position], name)

    def _txn_read_into(self, uids: np.ndarray, out: torch.Tensor, positions: np.ndarray) -> None:
        """Spans uids[positions] -> out[positions] through one LMDB read transaction (py-lmdb reads each whole record)."""
        record_of, row_of = self.record_of.data[uids[positions]], self.row_of.data[uids[positions]]
        with self._env_lock, self.env.begin(buffers=True) as txn:
            for record in np.unique(record_of).tolist():
                value = txn.get(batch_key(record))
                if value is None:
                    raise CorruptCacheError(f"{self.path.name}: spans record {record} is missing")
                header, payload = records.unpack(value, f"{self.path.name}: spans record {record}")
                for index in np.flatnonzero(record_of == record).tolist():
                    position = int(positions[index])
                    name = f"{self.path.name}: span {uids[position]} (record {record})"
                    records.read_span(header, payload, int(row_of[index]), out[position], name)

    def contains(self, uid: int) -> bool:
        return uid < len(self.committed.data) and bool(self.committed.data[uid])

    def evict(self, uids: np.ndarray) -> None:
        """Forget committed spans (their copy above is kept): the writer thread deletes their records, in order with
        its writes."""
        self.committed.data[uids] = False
        self.offset_of.data[uids] = -1  # LMDB may reuse the pages once the record is deleted
        self.record_bytes -= len(uids) * self.span_bytes
        future = self._writer.submit(self._delete, self.record_of.data[uids].tolist())
        self._inflight.append((future, np.empty(0, dtype=np.int64), 0))

    def _delete(self, doomed: list[int]) -> None:
        with self.env.begin(write=True) as txn:
            for record in doomed:
                txn.delete(batch_key(record))

    @property
    def nbytes(self) -> int:
        return self.record_bytes

    def close(self) -> None:
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
