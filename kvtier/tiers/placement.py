"""Placement: which tier each sealed span lives in, and when spans move between tiers.

New spans enter the GPU pool. When a pool runs low, its least recently selected spans move down (GPU -> pinned host
on a copy stream, host -> LMDB on the disk writer's thread), a batch at a time and before the pool is empty, so the
attention call rarely waits. A span is dropped from a tier only once its copy below is complete (the copy event
fired, the LMDB transaction committed); until then it is read from the tier above. Selected spans come back in one
batch per layer; a span on disk is read into the host pool first, and a host span selected again is promoted to
the GPU. Spans never change, so a disk copy stays valid after promotion and a later demotion needs no new write; an
unbounded host pool likewise keeps its copy of a promoted span, so moving it down again copies nothing (at most the
GPU pool's worth of spans is then held twice).

The tiers are SpanStores (gpu.py, host.py, disk_tier.py); the books are ledger.py's, the copies copies.py's, the
device-side location table device_table.py's. Booking a selection (recency, hit counters, disk spans brought up, hot
host spans promoted) has three words: `book(uids)` books it now (fetch and locate begin with it); `book_later(uids)`
takes the uids on the device, read through the device table, and `book_landed()` books them once their copy to the
host has landed (at the next book_later, or waiting, in stats and close).
"""
from __future__ import annotations

import weakref

import numpy as np
import torch

from kvtier.buffers import GrowableArray, upload
from kvtier.config import ReAttentionConfig
from kvtier.errors import TierFullError
from kvtier.tiers import DISK, GPU, HOST, TIERS
from kvtier.tiers.base import SpanStore
from kvtier.tiers.copies import Copies
from kvtier.tiers.device_table import DeviceTable
from kvtier.tiers.disk import LmdbStore
from kvtier.tiers.disk_tier import DiskTier
from kvtier.tiers.gpu import DevicePool
from kvtier.tiers.host import HostPool
from kvtier.tiers.ledger import Ledger

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
        spill = None
        if config.disk_path is not None:
            spill = LmdbStore.spill(config.disk_path, span_shape, dtype, config.budget_bytes("disk_budget"))
        self.disk = DiskTier(spill)
        weakref.finalize(self, self.disk.close)
        self.stores: tuple[SpanStore, ...] = (self.gpu, self.host, self.disk)  # by tier code
        self.ledger = Ledger(self.span_bytes)
        self.copies = Copies(self.gpu, self.host, device)
        # With a GPU budget but no disk tier every span is on the GPU or in pinned host memory, both readable by the
        # gather kernel: a device table says where, and selections read through it are booked later.
        self.table = DeviceTable(device) if gpu_cap is not None and spill is None else None

    @property
    def uids(self) -> int:
        """How many span uids were handed out: they are 0..uids-1."""
        return self.ledger.count

    @property
    def tier(self) -> GrowableArray:
        """Per uid: the tier it lives in (kvtier.tiers.GPU, HOST, DISK). Read only."""
        return self.ledger.tier

    @property
    def slot_is_uid(self) -> bool:
        """Every span is in the GPU pool for good, at slot == uid: the layer may index the pool directly."""
        return self.gpu.capacity is None and self.disk.saved is None

    @property
    def locates_on_device(self) -> bool:
        """The kernel path finds every span from the device (device_locations), so the CPU never waits for a
        selection: every span in the pool at slot == uid, or the device table (no disk tier, no loaded file)."""
        return self.slot_is_uid or self.table is not None

    def attach_saved(self, store: LmdbStore, count: int) -> None:
        """Spans 0..count-1 live in a saved cache's file, read by `store`."""
        self.table = None
        self.disk.attach_saved(store)
        self.ledger.new(count, DISK)

    # ---- entering -----------------------------------------------------------------------------------------------
    def add(self, spans: torch.Tensor) -> np.ndarray:
        """Newly sealed spans [N, 2, Hkv, S, D] on the device -> their uids [N]."""
        self.poll()
        self._make_room_on_gpu(spans.shape[0])
        uids = self.ledger.new(spans.shape[0], GPU)
        self.gpu.put(uids, spans)
        if self.slot_is_uid and not np.array_equal(self.gpu.slots_of(uids), uids):
            raise AssertionError("an unbounded GPU pool must place span uid at slot uid")
        self._publish(uids, GPU)
        self.ledger.tick()
        return uids

    def _publish(self, uids: np.ndarray, tier: int) -> None:
        """uids [N] now live in the GPU pool or the host pool (tier): tell the device table, if there is one."""
        if self.table is not None:
            loc = self.gpu.slots_of(uids) if tier == GPU else -1 - self.host.slots_of(uids)
            self.table.publish(uids, loc, self.ledger.count)

    # ---- booking selections -------------------------------------------------------------------------------------
    def book(self, uids: np.ndarray) -> None:
        """Book one selection now: distinct uids [M] an attention call selected are stamped used (the clock ticks)
        and counted (selections, hits and misses per tier); those on disk are brought up to the host."""
        self.poll()
        tier = self.ledger.select(uids)
        from_disk = uids[tier == DISK]
        if len(from_disk):
            self._bring_up_from_disk(from_disk)

    def book_later(self, uids: torch.Tensor) -> None:
        """uids (any shape, on the device) read through the device table by an attention call just queued: their
        copy to the host starts without waiting, and book_landed books them once it has landed - on every device
        at the next call at the earliest, so the CPU runs the same late booking."""
        self.book_landed()
        self.table.copy_to_host(uids)

    def book_landed(self, wait: bool = False) -> None:
        """Book the selections of book_later whose copy has landed (all of them, waiting, when `wait`): as `book`
        does, plus the bytes the gather read from host slots in place, and promotion of host spans selected often."""
        if self.table is None:
            return
        for uids in self.table.landed(wait):
            self.book(uids)
            self.ledger.record_move("host->gpu", int((self.ledger.tiers_of(uids) == HOST).sum()))
            self._promote_hot(uids)

    # ---- reading selections -------------------------------------------------------------------------------------
    def fetch(self, uids: np.ndarray) -> torch.Tensor:
        """Distinct uids [M] selected by one attention call -> their spans [M, 2, Hkv, S, D] on the device (booked)."""
        self.book(uids)
        tier = self.ledger.tiers_of(uids)
        out = torch.empty((len(uids), *self.span_shape), dtype=self.dtype, device=self.device)  # [M, 2, Hkv, S, D]
        on_gpu, on_host = np.flatnonzero(tier == GPU), np.flatnonzero(tier == HOST)
        if len(on_gpu):
            out[self._index(on_gpu)] = self.gpu.take(uids[on_gpu])
        if len(on_host):
            out[self._index(on_host)] = self.copies.host_to_gpu(uids[on_host])
            self.ledger.record_move("host->gpu", len(on_host))
            hot = np.flatnonzero(self.ledger.hot_on_host(uids))
            if len(hot):
                self._promote(uids[hot], out[self._index(hot)])
        return out

    def locate(self, uids: np.ndarray) -> np.ndarray:
        """Distinct uids [M] selected by one attention call (booked) -> where the gather kernel reads each, loc [M]
        int64: a GPU pool slot (>= 0) or -1 - a host slot (read in place through UVA). Host spans selected repeatedly
        are promoted to the GPU first. Call `host_reads_launched` once the kernel reading them is queued."""
        self.book(uids)
        self._promote_hot(uids)
        on_gpu = self.ledger.tiers_of(uids) == GPU
        loc = np.empty(len(uids), dtype=np.int64)
        loc[on_gpu] = self.gpu.slots_of(uids[on_gpu])
        loc[~on_gpu] = -1 - self.host.slots_of(uids[~on_gpu])
        self.ledger.record_move("host->gpu", int((~on_gpu).sum()))
        return loc

    def device_locations(self, uids: torch.Tensor, selections: torch.Tensor) -> torch.Tensor:
        """The kernel path when locates_on_device: uids [B, Hkv, k] on the device -> loc [B, Hkv, k] on the device
        (as locate's), without waiting for the CPU. `selections` holds the same uids once per selection ([B, Hkv, k]
        per KV head, else [B, 1, k]): booked later, or only counted as GPU hits when slot == uid."""
        if self.slot_is_uid:
            self.ledger.count_pool_hits(selections.numel())
            return uids
        self.book_later(selections)
        return self.table.lookup(uids)

    def pool_heads(self, uids: torch.Tensor, selections: torch.Tensor) -> torch.Tensor:
        """The reference path when slot_is_uid: uids [B, Hkv, k] on the device -> their spans [B, Hkv, k, 2, S, D],
        each row and KV head reading its own head; `selections` as in device_locations, counted as GPU hits."""
        self.ledger.count_pool_hits(selections.numel())
        return self.gpu.gather_heads(uids)

    def gather_sources(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """What the gather kernel reads a loc from: the GPU pool [slots, 2, Hkv, S, D] and the pinned host blocks,
        each [block_slots, 2, Hkv, S, D]."""
        return self.gpu.data, self.host.blocks

    def host_reads_launched(self) -> None:
        """A kernel reading host slots in place is queued: host slots are not rewritten from the CPU before it ran."""
        self.copies.host_reads_launched()

    def _index(self, positions: np.ndarray) -> torch.Tensor:
        return upload(positions, self.device)

    # ---- moving up ----------------------------------------------------------------------------------------------
    def _promote_hot(self, uids: np.ndarray) -> None:
        hot = uids[self.ledger.hot_on_host(uids)]
        if len(hot):
            self._promote(hot)

    def _promote(self, uids: np.ndarray, spans: torch.Tensor | None = None) -> None:
        """Host spans selected repeatedly -> the GPU pool: `spans` [N, 2, Hkv, S, D] already copied to the device
        (fetch), or None to copy them by one kernel reading the host slots in place (locate's kernel path)."""
        self._make_room_on_gpu(len(uids))
        if spans is None:
            self.copies.host_to_pool(uids)
            self.ledger.record_move("host->gpu", len(uids))
        else:
            self.gpu.put(uids, spans)
        self._publish(uids, GPU)
        if self.host.capacity is not None:  # a bounded host pool needs the room; an unbounded one keeps the copy
            self.host.evict(uids)
        self.ledger.promoted(uids, GPU)

    def _bring_up_from_disk(self, uids: np.ndarray) -> None:
        self._make_room_on_host(len(uids))
        self.copies.disk_to_host(uids, self.disk)
        self.ledger.promoted(uids, HOST)
        self.ledger.record_move("disk->host", len(uids))

    # ---- moving down --------------------------------------------------------------------------------------------
    def _make_room_on_gpu(self, count: int) -> None:
        capacity = self.gpu.capacity
        if capacity is None:
            return
        available = self.gpu.free_slots() + self.copies.in_flight_to_host()
        short = shortfall(count, capacity, available, self._headroom_spans)
        if self.host.capacity is not None:
            short = min(short, self.host.capacity // 2)
        if short > 0:
            self._move_to_host(self.ledger.least_recent(GPU, short, self.ledger.moving))
        while self.gpu.free_slots() < count:
            if not self.copies.in_flight_to_host():
                raise TierFullError(f"gpu_budget holds {capacity} spans and all are in use by this step; raise gpu_budget")
            self._landed_on_host(wait=True)

    def _move_to_host(self, uids: np.ndarray) -> None:
        kept = self.host.holds(uids)  # promoted spans whose host copy an unbounded host pool kept
        self._drop_from_gpu(uids[kept])
        uids = uids[~kept]
        if not len(uids):
            return
        self._make_room_on_host(len(uids))
        self.ledger.mark_moving(uids, True)
        self.copies.gpu_to_host(uids)
        self.ledger.evicted(GPU, len(uids))
        self.ledger.record_move("gpu->host", len(uids))

    def _drop_from_gpu(self, uids: np.ndarray) -> None:
        """Spans whose host copy is still there (spans never change) move down without a copy. On CUDA the kernels
        queued before still read their GPU slots, and anything written into them later is queued after those
        kernels on the same stream."""
        if not len(uids):
            return
        self._now_on_host(uids)
        self.ledger.evicted(GPU, len(uids))

    def _landed_on_host(self, wait: bool) -> None:
        """Spans whose GPU -> host copy completed now live on the host."""
        for uids in self.copies.landed_on_host(wait):
            self._now_on_host(uids)
            self.ledger.mark_moving(uids, False)

    def _now_on_host(self, uids: np.ndarray) -> None:
        self.gpu.evict(uids)
        self._publish(uids, HOST)
        self.ledger.moved_down(uids, HOST)

    def _make_room_on_host(self, count: int) -> None:
        capacity = self.host.capacity
        if capacity is None:
            return
        short = shortfall(count, capacity, self.host.free_slots() + self.ledger.writes, self._headroom_spans)
        if short > 0:
            victims = self.ledger.least_recent(HOST, short, self.ledger.writing)
            on_disk = self.disk.holds(victims)
            self._drop_from_host(victims[on_disk])
            self._write_to_disk(victims[~on_disk])
        while self.host.free_slots() < count:
            if not self.disk.pending():
                raise TierFullError(f"host_budget holds {capacity} spans and all are in use by this step; raise host_budget")
            self._written_to_disk(self.disk.wait_any())  # the store counts the time waited

    def _write_to_disk(self, uids: np.ndarray) -> None:
        if not len(uids):
            return
        if self.disk.over_budget(len(uids) * self.span_bytes):
            self.disk.evict(self.ledger.in_tier(GPU))  # the disk copies of spans on the GPU again are not needed
        self.copies.host_to_disk(uids, self.disk)
        self.ledger.mark_writing(uids, True)
        self.ledger.evicted(HOST, len(uids))
        self.ledger.record_move("host->disk", len(uids))

    def _written_to_disk(self, uids: np.ndarray) -> None:
        """Disk writes committed: drop those spans' host copies (unless used by the current call)."""
        if not len(uids):
            return
        self.ledger.mark_writing(uids, False)
        self._drop_from_host(uids[self.ledger.idle(uids, HOST)])

    def _drop_from_host(self, uids: np.ndarray) -> None:
        self.host.evict(uids)
        self.ledger.moved_down(uids, DISK)

    def poll(self) -> None:
        """Finish whatever completed in the background (copies to the host, commits to disk)."""
        self._landed_on_host(wait=False)
        self._written_to_disk(self.disk.poll())

    # ---- saving and reporting -----------------------------------------------------------------------------------
    def read_spans(self, uids: np.ndarray) -> torch.Tensor:
        """Any spans, wherever they live -> a CPU tensor [N, 2, Hkv, S, D] (for saving); nothing moves."""
        out = torch.empty((len(uids), *self.span_shape), dtype=self.dtype)  # [N, 2, Hkv, S, D]
        tier = self.ledger.tiers_of(uids)
        for code, store in enumerate(self.stores):
            where = np.flatnonzero(tier == code)
            if len(where):
                rows = torch.empty((len(where), *self.span_shape), dtype=self.dtype)  # [n, 2, Hkv, S, D]
                store.get_into(uids[where], rows)
                out[torch.from_numpy(where)] = rows
        return out

    def stats(self) -> dict:
        self.book_landed(wait=True)
        nbytes = {name: store.nbytes for name, store in zip(TIERS, self.stores)}
        return self.ledger.stats(nbytes, {"host": self.copies.host_wait_s, "disk": self.disk.wait_s})

    @staticmethod
    def empty_stats() -> dict:
        """stats() of a cache that has not seen a token yet."""
        return Ledger(span_bytes=0).stats(dict.fromkeys(TIERS, 0), {})

    def close(self) -> None:
        self.book_landed(wait=True)
        self._landed_on_host(wait=True)
        self.disk.close()


class SharedPlacement:
    """Makes a cache's Placements, one per device its layers' K/V live on (a model spread over GPUs by accelerate's
    device_map has layers on several), each from the first K/V of its device, and hands every layer its device's.
    `shares` (device -> the fraction of the model's attention layers on it) splits each byte budget among the devices:
    a device holding a quarter of the layers gets a quarter of gpu_budget, host_budget and disk_budget. Layers hold
    this object rather than the cache, so a cache dropped by its user is freed at once (no reference cycle)."""

    def __init__(self, config: ReAttentionConfig, shares: dict[torch.device, float] | None = None):
        self.config = config
        self.shares = shares or {}
        self.placements: dict[torch.device, Placement] = {}

    @property
    def placement(self) -> Placement | None:
        """The first placement made: the only one for a model on one device (None before the first K/V)."""
        return next(iter(self.placements.values()), None)

    def __call__(self, span_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, step_spans: int) -> Placement:
        first = self.placement
        if first is not None and (first.span_shape, first.dtype) != (tuple(span_shape), dtype):
            raise ValueError(f"every layer must hold K/V of one shape and dtype; got {span_shape} {dtype} after "
                             f"{first.span_shape} {first.dtype}")
        if device not in self.placements:
            self.placements[device] = Placement(self.config_on(device), span_shape, dtype, device, step_spans)
        return self.placements[device]

    def config_on(self, device: torch.device) -> ReAttentionConfig:
        """The config with each byte budget scaled to `device`'s share of the layers, or its gpu_budget the one given
        for it (a gpu_budget per device)."""
        share = self.shares.get(device, 1.0)
        per_device = self.config.device_budgets()
        names = ("host_budget", "disk_budget") if per_device else ("gpu_budget", "host_budget", "disk_budget")
        budgets = {name: self.config.budget_bytes(name) for name in names}
        scaled = {name: max(int(value * share), 1) for name, value in budgets.items() if value is not None}
        if per_device is not None:
            if str(device) not in per_device:
                raise ValueError(f"gpu_budget is given for {sorted(per_device)}, but this model has layers on "
                                 f"{device}: add its budget")
            return self.config.replace(**scaled, gpu_budget=per_device[str(device)])
        return self.config if share == 1.0 or not scaled else self.config.replace(**scaled)

    def stats(self) -> dict:
        """Every placement's stats() summed over the devices (span_bytes: the one span size); empty before the first
        K/V."""
        if not self.placements:
            return Placement.empty_stats()
        return _summed([placement.stats() for placement in self.placements.values()])

    def close(self) -> None:
        for placement in self.placements.values():
            placement.close()


def _summed(reports: list[dict]) -> dict:
    """Placement.stats() reports of several devices -> one: numbers summed, span_bytes kept (every device's is the
    same), nested reports summed alike."""
    first = reports[0]
    return {key: _summed([report[key] for report in reports]) if isinstance(value, dict)
            else value if key == "span_bytes" else sum(report[key] for report in reports)
            for key, value in first.items()}
