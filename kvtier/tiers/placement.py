"""Placement: which tier each sealed span lives in, and the moves between tiers.

New spans enter the GPU pool. When a pool runs low, its least recently selected spans move down (GPU -> pinned host
on a copy stream, host -> LMDB on the disk writer's thread), a batch at a time and before the pool is empty, so the
attention call rarely waits. A span is dropped from a tier only once its copy below is complete (the copy event
fired, the LMDB transaction committed); until then it is read from the tier above. Selected spans come back in one
batch per layer; a span on disk is read into the host pool first, and a host span selected again is promoted to
the GPU. Spans never change, so a disk copy stays valid after promotion and a later demotion needs no new write; an
unbounded host pool likewise keeps its copy of a promoted span, so moving it down again copies nothing (at most the
GPU pool's worth of spans is then held twice).
"""
from __future__ import annotations

import time
import weakref

import numpy as np
import torch

from kvtier import dispatch
from kvtier.buffers import GrowableArray, GrowableTensor, scratch_rows, upload
from kvtier.config import ReAttentionConfig
from kvtier.errors import TierFullError
from kvtier.metrics import DIRECTIONS, TierCounters
from kvtier.tiers import TIERS
from kvtier.tiers.disk import LmdbStore
from kvtier.tiers.gpu import DevicePool
from kvtier.tiers.host import HostPool

GPU, HOST, DISK = 0, 1, 2
PROMOTE_AFTER = 2  # a host span selected this many times since it moved down goes back up to the GPU
WRITE_SLICE_BYTES = 256 * 2**20  # host -> disk victims are copied for the writer this many bytes at a time
HEADROOM = 16  # a pool starts moving spans down when less than 1/HEADROOM of it is free, then frees 2/HEADROOM ...
HEADROOM_BYTES = 2**30  # ... and at most this much (a 96 GiB host pool would otherwise write 12 GiB to disk at once)


def shortfall(count: int, capacity: int, available: int, most: int | None = None) -> int:
    """Spans a pool of `capacity` should move down before taking `count` more, `available` being its free slots plus
    those on their way out: none while 1/HEADROOM (at most `most` spans) stays free, else enough to free twice that -
    so spans move in large, rare batches (each batch costs one scan for the least recently used)."""
    headroom = max(min(capacity // HEADROOM, capacity if most is None else most), 1)
    return 0 if available - count >= headroom else count + 2 * headroom - available


def capacity_of(budget: int | None, span_bytes: int, name: str, needed: int) -> int | None:
    """A byte budget -> how many spans it holds (None: no limit); TierFullError when it cannot hold `needed`."""
    if budget is None:
        return None
    spans = budget // span_bytes
    if spans < needed:
        raise TierFullError(
            f"{name}={budget} bytes holds {spans} spans of {span_bytes} bytes, but one attention step may need "
            f"{needed} in that tier (the spans selected for a query chunk plus those sealed by it); raise {name} to "
            f"at least {needed * span_bytes} bytes"
        )
    return spans


class Placement:
    def __init__(self, config: ReAttentionConfig, span_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, step_spans: int):
        """span_shape = (2, Hkv, S, D); step_spans = the most spans one attention step selects and seals."""
        self.span_shape, self.dtype, self.device = tuple(span_shape), dtype, device
        self.span_bytes = int(np.prod(span_shape)) * dtype.itemsize
        self._headroom_spans = HEADROOM_BYTES // self.span_bytes
        gpu_cap = capacity_of(config.budget_bytes("gpu_budget"), self.span_bytes, "gpu_budget", step_spans)
        host_cap = capacity_of(config.budget_bytes("host_budget"), self.span_bytes, "host_budget", step_spans)
        self.gpu = DevicePool(span_shape, dtype, device, gpu_cap)
        self.host = HostPool(span_shape, dtype, host_cap, pinned=device.type == "cuda")
        self.disk = None
        if config.disk_path is not None:
            self.disk = LmdbStore.spill(config.disk_path, span_shape, dtype, config.budget_bytes("disk_budget"))
            weakref.finalize(self, self.disk.close)
        self.archive: LmdbStore | None = None  # a loaded cache's spans (uids below archived)
        self.archived = 0
        self.uids = 0
        self.clock = 0  # one tick per fetch and per add: spans used at the current tick are never moved down
        self.tier = GrowableArray(np.int8, -1)  # per uid: GPU / HOST / DISK
        self.last_used = GrowableArray(np.int64, 0)
        self.selected = GrowableArray(np.int32, 0)  # selections since the span last moved down
        self.moving = GrowableArray(np.bool_, False)  # GPU -> host copy in flight
        self.writing = GrowableArray(np.bool_, False)  # host -> disk write queued, not committed
        self._writing = 0  # how many
        self.counters = {name: TierCounters() for name in TIERS}
        self.moved = dict.fromkeys(DIRECTIONS, 0)  # bytes
        self._copies: list[tuple[torch.cuda.Event | None, np.ndarray]] = []  # GPU -> host, oldest first
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._staging: torch.Tensor | None = None  # pinned [n, 2, Hkv, S, D] for host -> GPU copies
        self._staging_free: torch.cuda.Event | None = None
        self._disk_staging: torch.Tensor | None = None  # [n, 2, Hkv, S, D] pageable, spans read from disk
        self._host_reads: torch.cuda.Event | None = None  # after the last kernel that read host slots in place
        # With a GPU budget but no disk tier every span is on the GPU or in pinned host memory, both readable by the
        # gather kernel: a device table says where (GPU slot, or -1 - host slot); selections are booked later (note).
        self.where = None
        if gpu_cap is not None and self.disk is None:
            self.where = GrowableTensor((0,), 0, torch.long, device)  # [uids]
        self._noted: list[tuple[torch.cuda.Event | None, torch.Tensor]] = []  # selections not yet booked

    @property
    def unbounded(self) -> bool:
        """Every span is in the GPU pool for good, at slot == uid: the layer may index the pool directly."""
        return self.gpu.capacity is None and self.archive is None

    @property
    def located_on_device(self) -> bool:
        """The device table `where` locates every span (no disk tier, no saved file): the kernel path looks spans up
        on the device and the CPU never waits for a selection."""
        return self.where is not None

    def attach_archive(self, store: LmdbStore, count: int) -> None:
        """Spans 0..count-1 live in a saved cache's file."""
        self.where = None
        self.archive, self.archived = store, count
        weakref.finalize(self, store.close)
        self._new(count, DISK)

    def _new(self, count: int, tier: int) -> np.ndarray:
        uids = np.arange(self.uids, self.uids + count, dtype=np.int64)
        self.uids += count
        for array in (self.tier, self.last_used, self.selected, self.moving, self.writing):
            array.ensure(self.uids)
        self.tier.data[uids] = tier
        self.last_used.data[uids] = self.clock
        return uids

    # ---- entering and leaving ----------------------------------------------------------------------------------
    def add(self, spans: torch.Tensor) -> np.ndarray:
        """Newly sealed spans [N, 2, Hkv, S, D] on the device -> their uids [N]."""
        self.poll()
        self._make_room_on_gpu(spans.shape[0])
        uids = self._new(spans.shape[0], GPU)
        slots = self.gpu.put(uids, spans)
        if self.unbounded and not np.array_equal(slots, uids):
            raise AssertionError("an unbounded GPU pool must place span uid at slot uid")
        self._publish(uids, slots)
        self.clock += 1
        return uids

    def _publish(self, uids: np.ndarray, loc: np.ndarray) -> None:
        """Write where uids [N] now live (loc [N]: GPU slot, or -1 - host slot) into the device table, in stream order:
        kernels queued before still see the old place, which stays valid until then (see _finish_copies, _promote)."""
        if self.where is None or not len(uids):
            return
        self.where.extend_to(self.uids)
        pairs = upload(np.stack((uids, loc)), self.device)  # [2, N]
        self.where.data[pairs[0]] = pairs[1]

    def note(self, uids: torch.Tensor) -> None:
        """uids (any shape, on the device) read by an attention call just queued: copied to the host without waiting
        (pinned memory on CUDA), and booked (recency, counters, promotion of hot host spans) by a later call once the
        copy has landed - on every device at least one call later, so the CPU runs the same late booking."""
        self.catch_up()
        landed = torch.empty(uids.shape, dtype=uids.dtype, pin_memory=self._stream is not None)
        landed.copy_(uids, non_blocking=True)
        event = None
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record()
        self._noted.append((event, landed))

    def catch_up(self, wait: bool = False) -> None:
        """Book the noted selections whose copy has landed (all of them, waiting, when `wait`)."""
        while self._noted and (wait or self._noted[0][0] is None or self._noted[0][0].query()):
            event, landed = self._noted.pop(0)
            if event is not None:
                event.synchronize()
            self._book(np.unique(landed.numpy()))

    def _book(self, uids: np.ndarray) -> None:
        """Distinct uids [M] an attention call read through `where`: count them; promote host spans selected often."""
        self._selected(uids)
        tier = self.tier.data[uids]
        self.moved["host->gpu"] += int((tier == HOST).sum()) * self.span_bytes  # the gather read them in place
        hot = uids[(tier == HOST) & (self.selected.data[uids] >= PROMOTE_AFTER)]
        if len(hot):
            self._promote(hot)

    def _selected(self, uids: np.ndarray) -> None:
        """Distinct uids [M] selected by one attention call: count them, and bring those on disk up to the host."""
        self.poll()
        self.clock += 1
        self.last_used.data[uids] = self.clock
        self.selected.data[uids] += 1
        self._count_hits(self.tier.data[uids])
        from_disk = uids[self.tier.data[uids] == DISK]
        if len(from_disk):
            self._load_from_disk(from_disk)

    def fetch(self, uids: np.ndarray) -> torch.Tensor:
        """Distinct uids [M] selected by one attention call -> their spans [M, 2, Hkv, S, D] on the device."""
        self._selected(uids)
        tier = self.tier.data[uids]
        out = torch.empty((len(uids), *self.span_shape), dtype=self.dtype, device=self.device)  # [M, 2, Hkv, S, D]
        on_gpu, on_host = np.flatnonzero(tier == GPU), np.flatnonzero(tier == HOST)
        if len(on_gpu):
            out[self._index(on_gpu)] = self.gpu.take(uids[on_gpu])
        if len(on_host):
            out[self._index(on_host)] = self._host_to_device(uids[on_host])
            hot = on_host[self.selected.data[uids[on_host]] >= PROMOTE_AFTER]
            if len(hot):
                self._promote(uids[hot], out[self._index(hot)])
        return out

    def locate(self, uids: np.ndarray) -> np.ndarray:
        """Distinct uids [M] selected by one attention call -> where the gather kernel reads each, loc [M] int64: a
        GPU pool slot (>= 0) or -1 - a host slot (read in place through UVA). Host spans selected repeatedly are
        promoted to the GPU first. Call `host_reads_launched` once the kernel reading them is queued."""
        self._selected(uids)
        tier = self.tier.data[uids]
        hot = uids[(tier == HOST) & (self.selected.data[uids] >= PROMOTE_AFTER)]
        if len(hot):
            self._promote(hot)
        on_gpu = self.tier.data[uids] == GPU
        loc = np.empty(len(uids), dtype=np.int64)
        loc[on_gpu] = self.gpu.map.lookup(uids[on_gpu])
        loc[~on_gpu] = -1 - self.host.map.lookup(uids[~on_gpu])
        self.moved["host->gpu"] += int((~on_gpu).sum()) * self.span_bytes
        return loc

    def host_reads_launched(self) -> None:
        """A kernel reading host slots is queued: host slots are not rewritten from the CPU before it has run."""
        if self._stream is not None:
            self._host_reads = torch.cuda.Event()
            self._host_reads.record()

    def _count_hits(self, tier: np.ndarray) -> None:
        counts = np.bincount(tier, minlength=3)
        self.counters["gpu"].hits += int(counts[GPU])
        self.counters["gpu"].misses += int(counts[HOST] + counts[DISK])
        self.counters["host"].hits += int(counts[HOST])
        self.counters["host"].misses += int(counts[DISK])
        self.counters["disk"].hits += int(counts[DISK])

    def _index(self, positions: np.ndarray) -> torch.Tensor:
        return upload(positions, self.device)

    def _host_to_device(self, uids: np.ndarray) -> torch.Tensor:
        """One batched copy: host slots -> pinned staging -> the device (asynchronous on CUDA)."""
        start = time.perf_counter()
        staging = self._staging_rows(len(uids))
        self.host.get_into(uids, staging)
        rows = staging.to(self.device, non_blocking=True)
        if self._stream is not None:
            self._staging_free = torch.cuda.Event()
            self._staging_free.record()
        self.counters["host"].wait_s += time.perf_counter() - start
        self.moved["host->gpu"] += len(uids) * self.span_bytes
        return rows

    def _staging_rows(self, count: int) -> torch.Tensor:
        if self._staging_free is not None:
            self._staging_free.synchronize()  # the previous copy out of the staging buffer has finished
        self._staging = scratch_rows(self._staging, count, self.span_shape, self.dtype, self._stream is not None)
        return self._staging[:count]

    def _promote(self, uids: np.ndarray, spans: torch.Tensor | None = None) -> None:
        """Host spans selected repeatedly -> the GPU pool: `spans` [N, ...] already copied to the device (fetch), or
        None to copy them with one kernel reading the pinned host slots in place through UVA (locate's kernel path;
        the host slots are rewritten only after `host_reads_launched`'s event, which follows that kernel)."""
        self._make_room_on_gpu(len(uids))
        if spans is None:
            slots = np.stack((self.gpu.reserve(uids), self.host.map.lookup(uids)))  # [2, N]: pool, host
            dispatch.copy_host_spans(self.gpu.data, self.host.blocks, upload(slots, self.device))
            self.moved["host->gpu"] += len(uids) * self.span_bytes
        else:
            self.gpu.put(uids, spans)
        self._publish(uids, self.gpu.map.lookup(uids))
        if self.host.map.capacity is not None:  # a bounded host pool needs the room; an unbounded one keeps the copy
            self.host.evict(uids)
        self.tier.data[uids] = GPU
        self.counters["gpu"].promotions += len(uids)

    def _load_from_disk(self, uids: np.ndarray) -> None:
        """Disk spans -> pinned staging -> the host pool (one read transaction per store)."""
        self._make_room_on_host(len(uids))
        # pageable: a CPU to CPU copy gains nothing from pinned rows, and pinning more next to a large pinned pool
        # may wait for the kernel to write the spill file's dirty pages back
        self._disk_staging = scratch_rows(self._disk_staging, len(uids), self.span_shape, self.dtype)
        staging = self._disk_staging[: len(uids)]
        self._read_disk(uids, staging)
        if self._host_reads is not None:
            self._host_reads.synchronize()  # a queued gather may still read the host slots about to be rewritten
        self.host.put(uids, staging)
        self.tier.data[uids] = HOST
        self.selected.data[uids] = 1
        self.counters["host"].promotions += len(uids)
        self.moved["disk->host"] += len(uids) * self.span_bytes

    # ---- moving down -------------------------------------------------------------------------------------------
    def _least_recent(self, tier: int, count: int, busy: GrowableArray) -> np.ndarray:
        """Up to `count` uids of `tier`, least recently selected first, not selected by the current call, not busy."""
        live = slice(0, self.uids)
        candidates = np.flatnonzero(
            (self.tier.data[live] == tier) & (self.last_used.data[live] < self.clock) & ~busy.data[live]
        )
        if len(candidates) > count:
            candidates = candidates[np.argpartition(self.last_used.data[candidates], count - 1)[:count]]
        return candidates

    def _make_room_on_gpu(self, count: int) -> None:
        capacity = self.gpu.capacity
        if capacity is None:
            return
        in_flight = sum(len(uids) for _, uids in self._copies)
        short = shortfall(count, capacity, self.gpu.map.free_count() + in_flight, self._headroom_spans)
        if self.host.map.capacity is not None:
            short = min(short, self.host.map.capacity // 2)
        if short > 0:
            self._spill_to_host(self._least_recent(GPU, short, self.moving))
        while self.gpu.map.free_count() < count:
            if not self._copies:
                raise TierFullError(f"gpu_budget holds {capacity} spans and all are in use by this step; raise gpu_budget")
            self._finish_copies(wait=True)

    def _spill_to_host(self, uids: np.ndarray) -> None:
        kept = self.host.map.holds(uids)  # promoted spans whose host copy an unbounded host pool kept
        self._drop_from_gpu(uids[kept])
        uids = uids[~kept]
        if not len(uids):
            return
        self._make_room_on_host(len(uids))
        self.moving.data[uids] = True
        event = None
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self.gpu.data.record_stream(self._stream)
                self.host.put(uids, self.gpu.take(uids))
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            self.host.put(uids, self.gpu.take(uids))
        self._copies.append((event, uids))
        self.counters["gpu"].evictions += len(uids)
        self.moved["gpu->host"] += len(uids) * self.span_bytes

    def _drop_from_gpu(self, uids: np.ndarray) -> None:
        """Spans whose host copy is still there (spans never change) move down without a copy: their GPU slots are
        freed now. On CUDA the kernels queued before still read those slots, and anything written into them later is
        queued after those kernels on the same stream."""
        if not len(uids):
            return
        self.gpu.evict(uids)
        self._publish(uids, -1 - self.host.map.lookup(uids))
        self.tier.data[uids] = HOST
        self.selected.data[uids] = 0
        self.counters["gpu"].evictions += len(uids)

    def _finish_copies(self, wait: bool) -> None:
        """Spans whose GPU -> host copy completed now live on the host; their GPU slots are freed."""
        while self._copies:
            event, uids = self._copies[0]
            if event is not None and not event.query():
                if not wait:
                    return
                start = time.perf_counter()
                event.synchronize()
                self.counters["host"].wait_s += time.perf_counter() - start
                wait = False
            self._copies.pop(0)
            self.gpu.evict(uids)
            self._publish(uids, -1 - self.host.map.lookup(uids))
            self.tier.data[uids] = HOST
            self.moving.data[uids] = False
            self.selected.data[uids] = 0

    def _make_room_on_host(self, count: int) -> None:
        capacity = self.host.map.capacity
        if capacity is None:
            return
        short = shortfall(count, capacity, self.host.map.free_count() + self._writing, self._headroom_spans)
        if short > 0:
            victims = self._least_recent(HOST, short, self.writing)
            on_disk = self._has_disk_copy(victims)
            self._drop_from_host(victims[on_disk])
            self._write_to_disk(victims[~on_disk])
        while self.host.map.free_count() < count:
            if self.disk is None or not self.disk.pending():
                raise TierFullError(f"host_budget holds {capacity} spans and all are in use by this step; raise host_budget")
            self._committed(self.disk.wait_any())  # the store counts the time waited

    def _has_disk_copy(self, uids: np.ndarray) -> np.ndarray:
        in_archive = uids < self.archived
        if self.disk is None:
            return in_archive
        self.disk.committed.ensure(self.uids)
        return in_archive | self.disk.committed.data[uids]

    def _write_to_disk(self, uids: np.ndarray) -> None:
        if not len(uids):
            return
        if self.disk is None:
            raise TierFullError("the host tier is full and there is no disk tier: set disk_path, or raise host_budget")
        self._relieve_disk(len(uids))
        # the writer's own copies, a slice at a time (a batch of victims is up to 2 x HEADROOM_BYTES), each freed
        # once written
        per_slice = max(1, WRITE_SLICE_BYTES // self.span_bytes)
        for start in range(0, len(uids), per_slice):
            part = uids[start : start + per_slice]
            copy = torch.empty((len(part), *self.span_shape), dtype=self.dtype)  # [n, 2, Hkv, S, D]
            self.host.get_into(part, copy)
            self.disk.put(part, copy)
        self.writing.data[uids] = True
        self._writing += len(uids)
        self.counters["host"].evictions += len(uids)
        self.moved["host->disk"] += len(uids) * self.span_bytes

    def _relieve_disk(self, count: int) -> None:
        """Near the disk budget, delete the disk copies of spans that are on the GPU again."""
        budget = self.disk.budget
        if budget is None or self.disk.record_bytes + count * self.span_bytes <= budget:
            return
        self.disk.committed.ensure(self.uids)
        redundant = np.flatnonzero((self.tier.data[: self.uids] == GPU) & self.disk.committed.data[: self.uids])
        if len(redundant):
            self.disk.evict(redundant)

    def _committed(self, uids: np.ndarray) -> None:
        """Disk writes committed: drop those spans' host copies (unless selected by the current call)."""
        if not len(uids):
            return
        self.writing.data[uids] = False
        self._writing -= len(uids)
        still_host = uids[(self.tier.data[uids] == HOST) & (self.last_used.data[uids] < self.clock)]
        self._drop_from_host(still_host)

    def _drop_from_host(self, uids: np.ndarray) -> None:
        self.host.evict(uids)
        self.tier.data[uids] = DISK
        self.selected.data[uids] = 0

    def poll(self) -> None:
        """Finish whatever completed in the background (copies to the host, commits to disk)."""
        self._finish_copies(wait=False)
        if self.disk is not None:
            self._committed(self.disk.poll())

    # ---- reporting ---------------------------------------------------------------------------------------------
    def _read_disk(self, uids: np.ndarray, out: torch.Tensor) -> None:
        """Spans on disk (in the saved cache's file or the spill file) -> out [N, 2, Hkv, S, D] on the host."""
        archived = uids < self.archived
        for store, part in ((self.archive, archived), (self.disk, ~archived)):
            if part.all():
                store.get_into(uids, out)
            elif part.any():
                rows = torch.empty((int(part.sum()), *self.span_shape), dtype=self.dtype)
                store.get_into(uids[part], rows)
                out[torch.from_numpy(np.flatnonzero(part))] = rows

    def read_spans(self, uids: np.ndarray) -> torch.Tensor:
        """Any spans, wherever they live -> a CPU tensor [N, 2, Hkv, S, D] (for saving); nothing moves."""
        out = torch.empty((len(uids), *self.span_shape), dtype=self.dtype)
        tier = self.tier.data[uids]
        for code in (GPU, HOST, DISK):
            where = np.flatnonzero(tier == code)
            if not len(where):
                continue
            if code == GPU:
                rows = self.gpu.take(uids[where]).cpu()
            else:
                rows = torch.empty((len(where), *self.span_shape), dtype=self.dtype)
                (self.host.get_into if code == HOST else self._read_disk)(uids[where], rows)
            out[torch.from_numpy(where)] = rows
        return out

    def stats(self) -> dict:
        self.catch_up(wait=True)
        counts = np.bincount(self.tier.data[: self.uids].astype(np.int64) + 1, minlength=4)[1:]
        disk_bytes = (self.disk.nbytes if self.disk is not None else 0) + self.archived * self.span_bytes
        self.counters["disk"].wait_s = sum(store.wait_s for store in (self.disk, self.archive) if store is not None)
        return {
            "span_bytes": self.span_bytes,
            "spans": {name: int(counts[code]) for code, name in enumerate(TIERS)},
            "bytes": {"gpu": self.gpu.nbytes, "host": self.host.nbytes, "disk": disk_bytes},
            "moved": dict(self.moved),
            "tiers": {name: counter.as_dict() for name, counter in self.counters.items()},
        }

    @staticmethod
    def empty_stats() -> dict:
        """stats() of a cache that has not seen a token yet."""
        return {
            "span_bytes": 0,
            "spans": dict.fromkeys(TIERS, 0),
            "bytes": dict.fromkeys(TIERS, 0),
            "moved": dict.fromkeys(DIRECTIONS, 0),
            "tiers": {name: TierCounters().as_dict() for name in TIERS},
        }

    def close(self) -> None:
        self.catch_up(wait=True)
        self._finish_copies(wait=True)
        for store in (self.disk, self.archive):
            if store is not None:
                store.close()


class SharedPlacement:
    """Makes a cache's Placement from its first layer's K/V and hands the same one to every layer. Layers hold this
    object rather than the cache, so a cache dropped by its user is freed at once (no reference cycle)."""

    def __init__(self, config: ReAttentionConfig):
        self.config = config
        self.placement: Placement | None = None

    def __call__(self, span_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, step_spans: int) -> Placement:
        if self.placement is None:
            self.placement = Placement(self.config, span_shape, dtype, device, step_spans)
        elif (self.placement.span_shape, self.placement.dtype) != (tuple(span_shape), dtype):
            raise ValueError(
                f"every layer must hold K/V of one shape and dtype; got {span_shape} {dtype} after "
                f"{self.placement.span_shape} {self.placement.dtype}"
            )
        return self.placement
