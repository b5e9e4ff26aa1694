"""The placement's books: per span uid its tier, when it was last selected, how often since it last moved down, and
whether a move down is in flight; a clock; per tier the hits, misses, promotions and evictions, and the bytes moved
in each direction (what `cache.stats()` reports). Nothing here moves a byte: copies.py does, placement.py decides."""
from __future__ import annotations

import numpy as np

from kvtier.buffers import GrowableArray
from kvtier.metrics import DIRECTIONS, TierCounters
from kvtier.tiers import DISK, GPU, HOST, TIERS

PROMOTE_AFTER = 2  # a host span selected this many times since it moved down goes back up to the GPU


class Ledger:
    def __init__(self, span_bytes: int):
        self.span_bytes = span_bytes
        self.count = 0  # uids handed out: 0..count-1
        self.clock = 0  # one tick per selection and per add: spans used at the current tick are never moved down
        self.tier = GrowableArray(np.int8, -1)  # per uid: GPU / HOST / DISK
        self.last_used = GrowableArray(np.int64, 0)  # per uid: the clock when last selected (or added)
        self.selected = GrowableArray(np.int32, 0)  # per uid: selections since the span last moved down
        self.moving = GrowableArray(np.bool_, False)  # per uid: GPU -> host copy in flight
        self.writing = GrowableArray(np.bool_, False)  # per uid: host -> disk write queued, not committed
        self.writes = 0  # how many are writing
        self.counters = {name: TierCounters() for name in TIERS}
        self.moved = dict.fromkeys(DIRECTIONS, 0)  # bytes

    def new(self, count: int, tier: int) -> np.ndarray:
        """`count` new uids [count] living in `tier`, used now."""
        uids = np.arange(self.count, self.count + count, dtype=np.int64)
        self.count += count
        for array in (self.tier, self.last_used, self.selected, self.moving, self.writing):
            array.ensure(self.count)
        self.tier.data[uids] = tier
        self.last_used.data[uids] = self.clock
        return uids

    def tick(self) -> None:
        self.clock += 1

    def tiers_of(self, uids: np.ndarray) -> np.ndarray:
        """uids [N] -> their tier codes [N]."""
        return self.tier.data[uids]

    def in_tier(self, tier: int) -> np.ndarray:
        """Every uid living in `tier`, ascending."""
        return np.flatnonzero(self.tier.data[: self.count] == tier)

    # ---- selections ---------------------------------------------------------------------------------------------
    def select(self, uids: np.ndarray) -> np.ndarray:
        """Distinct uids [M] selected by one attention call: tick, stamp them used now, count the selection and each
        tier's hits and misses -> their tiers [M]."""
        self.tick()
        self.last_used.data[uids] = self.clock
        self.selected.data[uids] += 1
        tier = self.tier.data[uids]
        counts = np.bincount(tier, minlength=len(TIERS))
        self.counters["gpu"].hits += int(counts[GPU])
        self.counters["gpu"].misses += int(counts[HOST] + counts[DISK])
        self.counters["host"].hits += int(counts[HOST])
        self.counters["host"].misses += int(counts[DISK])
        self.counters["disk"].hits += int(counts[DISK])
        return tier

    def count_pool_hits(self, count: int) -> None:
        """`count` selections read from the GPU pool without being booked (every span lives there)."""
        self.counters["gpu"].hits += count

    def hot_on_host(self, uids: np.ndarray) -> np.ndarray:
        """uids [M] -> [M] bool: on the host and selected PROMOTE_AFTER times since they moved down there."""
        return (self.tier.data[uids] == HOST) & (self.selected.data[uids] >= PROMOTE_AFTER)

    # ---- moves ----------------------------------------------------------------------------------------------------
    def idle(self, index: np.ndarray | slice, tier: int) -> np.ndarray:
        """uids at `index` -> bool: living in `tier` and not used at the current tick (free to move down)."""
        return (self.tier.data[index] == tier) & (self.last_used.data[index] < self.clock)

    def least_recent(self, tier: int, count: int, busy: GrowableArray) -> np.ndarray:
        """Up to `count` uids of `tier`, least recently selected first, not used at the current tick, not `busy`."""
        live = slice(0, self.count)
        candidates = np.flatnonzero(self.idle(live, tier) & ~busy.data[live])
        if len(candidates) > count:
            candidates = candidates[np.argpartition(self.last_used.data[candidates], count - 1)[:count]]
        return candidates

    def moved_down(self, uids: np.ndarray, tier: int) -> None:
        """uids now live in `tier` (below where they were); their selections start again from zero."""
        self.tier.data[uids] = tier
        self.selected.data[uids] = 0

    def promoted(self, uids: np.ndarray, tier: int) -> None:
        """uids now live in `tier` (above where they were), brought up by a selection, which counts once there."""
        self.tier.data[uids] = tier
        self.selected.data[uids] = 1
        self.counters[TIERS[tier]].promotions += len(uids)

    def evicted(self, tier: int, count: int) -> None:
        self.counters[TIERS[tier]].evictions += count

    def record_move(self, direction: str, count: int) -> None:
        """`count` spans' bytes moved in `direction` (one of metrics.DIRECTIONS)."""
        self.moved[direction] += count * self.span_bytes

    def mark_moving(self, uids: np.ndarray, moving: bool) -> None:
        self.moving.data[uids] = moving

    def mark_writing(self, uids: np.ndarray, writing: bool) -> None:
        self.writing.data[uids] = writing
        self.writes += len(uids) if writing else -len(uids)

    # ---- reporting ----------------------------------------------------------------------------------------------
    def stats(self, nbytes: dict[str, int], wait_s: dict[str, float]) -> dict:
        """The placement's part of cache.stats(): `nbytes` and `wait_s` per tier are the stores' own."""
        counts = np.bincount(self.tier.data[: self.count].astype(np.int64) + 1, minlength=len(TIERS) + 1)[1:]
        for name, seconds in wait_s.items():
            self.counters[name].wait_s = seconds
        return {
            "span_bytes": self.span_bytes,
            "spans": {name: int(counts[code]) for code, name in enumerate(TIERS)},
            "bytes": dict(nbytes),
            "moved": dict(self.moved),
            "tiers": {name: counter.as_dict() for name, counter in self.counters.items()},
        }

