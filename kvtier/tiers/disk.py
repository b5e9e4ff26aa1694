"""The disk tier: spans as checksummed records in an LMDB file. Writes run on a background thread; a span counts as
on disk only once the transaction holding it has committed. The same store reads a saved cache (read-only)."""
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

INITIAL_MAP_BYTES = 64 * 2**20
MAX_PENDING_BYTES = 512 * 2**20  # spans handed to the writer and not yet committed, before put() waits


def span_key(uid: int) -> bytes:
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


class LmdbStore:
    """Spans by uid in one LMDB file. `spill(directory)` makes a scratch file removed on close; `archive(path)` opens a
    saved cache read-only."""

    def __init__(self, env: lmdb.Environment, path: Path, span_shape, dtype, budget: int | None, scratch: bool):
        self.env, self.path, self.scratch = env, path, scratch
        self.span_shape, self.dtype = tuple(span_shape), dtype
        self.budget = budget
        self.record_bytes = 0  # bytes of records written or queued
        self.committed = GrowableArray(np.bool_, False)  # per uid: its record is committed
        self._env_lock = threading.Lock()  # readers vs. map resizes
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-disk") if scratch else None
        self._inflight: list[tuple[Future, np.ndarray, int]] = []
        self._done: list[np.ndarray] = []
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
    def archive(cls, env: lmdb.Environment, path: Path, span_shape, dtype, uids: int) -> "LmdbStore":
        """A saved cache's spans (uids 0..uids-1), read-only."""
        store = cls(env, path, span_shape, dtype, None, scratch=False)
        store.committed.ensure(uids)
        store.committed.data[:uids] = True
        return store

    # ---- writing (background thread) ---------------------------------------------------------------------------
    def put(self, uids: np.ndarray, spans: torch.Tensor) -> None:
        """Queue spans [N, 2, Hkv, S, D] (a CPU tensor the store now owns) for writing; returns at once."""
        if not self.scratch:
            raise CacheWriteError(f"{self.path} is a saved cache, opened read-only")
        size = spans.numel() * spans.element_size()
        if self.budget is not None and self.record_bytes + size > self.budget:
            raise TierFullError(
                f"the disk tier is full: disk_budget={self.budget} bytes already holds {self.record_bytes} bytes of "
                f"spans; raise disk_budget (or gpu_budget / host_budget)"
            )
        self.record_bytes += size
        while sum(pending for _, _, pending in self._inflight) > MAX_PENDING_BYTES:
            self._wait_oldest()
        future = self._writer.submit(self._write, uids.copy(), spans)
        self._inflight.append((future, uids.copy(), size))

    def _write(self, uids: np.ndarray, spans: torch.Tensor) -> None:
        items = [(span_key(uid), records.encode_tensor(span)) for uid, span in zip(uids.tolist(), spans)]
        try:
            put_records(self.env, items, self._env_lock)
        except lmdb.Error as err:
            raise CacheWriteError(f"writing spilled spans to {self.path} failed ({err}); free disk space or move disk_path") from None

    def _wait_oldest(self) -> None:
        future, uids, _ = self._inflight.pop(0)
        start = time.perf_counter()
        future.result()  # re-raises the writer's CacheWriteError here, on the caller's thread
        self.wait_s += time.perf_counter() - start
        self._mark(uids)

    def _mark(self, uids: np.ndarray) -> None:
        if not len(uids):
            return
        self.committed.ensure(int(uids.max()) + 1)
        self.committed.data[uids] = True
        self._done.append(uids)

    def poll(self) -> np.ndarray:
        """uids whose records committed since the last poll."""
        while self._inflight and self._inflight[0][0].done():
            self._wait_oldest()
        return self._drain()

    def wait_any(self) -> np.ndarray:
        """Block until the oldest queued write committed -> uids committed since the last poll."""
        if self._inflight:
            self._wait_oldest()
        return self.poll()

    def _drain(self) -> np.ndarray:
        done, self._done = self._done, []
        return np.concatenate(done) if done else np.empty(0, dtype=np.int64)

    def pending(self) -> int:
        return len(self._inflight)

    # ---- reading -------------------------------------------------------------------------------------------------
    def get_into(self, uids: np.ndarray, out: torch.Tensor) -> None:
        """Read committed spans into out [N, 2, Hkv, S, D] (a CPU tensor), verifying each record."""
        start = time.perf_counter()
        with self._env_lock, self.env.begin(buffers=True) as txn:
            for row, uid in enumerate(uids.tolist()):
                value = txn.get(span_key(uid))
                if value is None:
                    raise CorruptCacheError(f"{self.path}: span {uid} is missing")
                header, payload = records.decode(value, f"span {uid}")
                if header.get("shape") != list(self.span_shape) or header.get("dtype") != str(self.dtype).removeprefix("torch."):
                    raise CorruptCacheError(f"{self.path}: span {uid} has shape {header.get('shape')} {header.get('dtype')}, expected {list(self.span_shape)} {self.dtype}")
                records.decode_into(payload, out[row])
        self.wait_s += time.perf_counter() - start

    def contains(self, uid: int) -> bool:
        return uid < len(self.committed.data) and bool(self.committed.data[uid])

    def evict(self, uids: np.ndarray) -> None:
        """Delete committed spans (their copy above is kept); the writer thread deletes them in order with its writes."""
        self.committed.data[uids] = False
        self.record_bytes -= len(uids) * int(np.prod(self.span_shape)) * self.dtype.itemsize
        self._inflight.append((self._writer.submit(self._delete, uids.copy()), np.empty(0, dtype=np.int64), 0))

    def _delete(self, uids: np.ndarray) -> None:
        with self.env.begin(write=True) as txn:
            for uid in uids.tolist():
                txn.delete(span_key(uid))

    @property
    def nbytes(self) -> int:
        return self.record_bytes

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        self._inflight.clear()
        self.env.close()
        if self.scratch:
            for path in (self.path, Path(str(self.path) + "-lock")):
                path.unlink(missing_ok=True)
