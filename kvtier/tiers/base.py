"""What every span store offers (the protocol the placement composes), and the uid -> slot map of the two pools.

A span is one sealed span of one layer and one sequence: K and V of all KV heads, `[2, Hkv, S, D]`, named by a uid
unique within its cache. Stores hold whole spans; batches of spans travel as `[N, 2, Hkv, S, D]` tensors.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from kvtier.buffers import GrowableArray


@runtime_checkable
class SpanStore(Protocol):
    """One tier's storage. The GPU pool, the host pool and the LMDB files all keep it; the placement moves spans
    between them through it (and through a few pool-only methods where the gather kernel needs slots)."""

    def put(self, uids: np.ndarray, spans: torch.Tensor) -> None:
        """Store spans [N, 2, Hkv, S, D] under uids [N] (not yet held here)."""

    def get_into(self, uids: np.ndarray, out: torch.Tensor) -> None:
        """Copy the spans of uids [N] (all held here) into out [N, 2, Hkv, S, D]."""

    def contains(self, uid: int) -> bool:
        """Whether the span of uid is held here (complete: copied, committed)."""

    def holds(self, uids: np.ndarray) -> np.ndarray:
        """contains for many: uids [N] -> [N] bool."""

    def evict(self, uids: np.ndarray) -> None:
        """Forget the spans of uids (their room is reused)."""

    @property
    def nbytes(self) -> int:
        """Bytes this store holds now."""


def entries(array: GrowableArray, uids: np.ndarray) -> np.ndarray:
    """A per-uid array's entries at uids [N] -> [N], its fill value for uids beyond its end."""
    out = np.full(len(uids), array.fill, dtype=array.data.dtype)
    known = uids < len(array.data)
    out[known] = array.data[uids[known]]
    return out


class SlotMap:
    """uid -> slot in a pool of equal slots, with a free list. `capacity` None: the pool grows without bound."""

    def __init__(self, capacity: int | None):
        self.capacity = capacity
        self.slot_of = GrowableArray(np.int64, -1)
        self.created = 0  # slots handed out at least once: the pool's high-water mark
        self._free = np.empty(0, dtype=np.int64)  # released slots, reused last-in first-out
        self.used = 0

    def free_count(self) -> int | float:
        return float("inf") if self.capacity is None else self.capacity - self.used

    def created_after(self, count: int) -> int:
        """The high-water mark once `count` more uids are assigned (released slots are reused first)."""
        return self.created + max(0, count - len(self._free))

    def assign(self, uids: np.ndarray) -> np.ndarray:
        """Slots for uids (not yet present) -> slots [N]: released slots first, then new ones."""
        count = len(uids)
        if count > self.free_count():
            raise AssertionError(f"pool full: {count} slots asked, {self.free_count()} free (make room first)")
        reused = self._free[max(len(self._free) - count, 0) :][::-1]
        self._free = self._free[: len(self._free) - len(reused)]
        fresh = np.arange(self.created, self.created + count - len(reused), dtype=np.int64)
        self.created += len(fresh)
        slots = np.concatenate((reused, fresh))
        if count:
            self.slot_of.ensure(int(uids.max()) + 1)
            self.slot_of.data[uids] = slots
        self.used += count
        return slots

    def release(self, uids: np.ndarray) -> None:
        slots = self.lookup(uids)
        self.slot_of.data[uids] = -1
        self._free = np.concatenate((self._free, np.sort(slots)[::-1]))  # lowest popped first: runs stay contiguous
        self.used -= len(uids)

    def lookup(self, uids: np.ndarray) -> np.ndarray:
        """uids [N] (all present) -> their slots [N]."""
        if not len(uids):
            return np.empty(0, dtype=np.int64)
        slots = self.slot_of.data[uids] if uids.max() < len(self.slot_of.data) else np.full(len(uids), -1)
        if (slots < 0).any():
            raise KeyError(f"span(s) not in this pool: {uids[slots < 0][:8].tolist()}")
        return slots

    def contains(self, uid: int) -> bool:
        return uid < len(self.slot_of.data) and bool(self.slot_of.data[uid] >= 0)

    def holds(self, uids: np.ndarray) -> np.ndarray:
        """uids [N] -> whether each has a slot here [N] bool."""
        return entries(self.slot_of, uids) >= 0


class SlotPool:
    """What the GPU and host pools share: the SpanStore methods a slot map answers, and the pool-only questions the
    placement asks (a span's slot, for the gather kernel's table; how much room is left)."""

    def __init__(self, capacity: int | None):
        self._map = SlotMap(capacity)

    @property
    def capacity(self) -> int | None:
        """Slots this pool may hold at most (None: no limit)."""
        return self._map.capacity

    def free_slots(self) -> int | float:
        """Slots free now (infinite without a capacity)."""
        return self._map.free_count()

    def slots_of(self, uids: np.ndarray) -> np.ndarray:
        """uids [N] (all held) -> their slots in this pool [N]."""
        return self._map.lookup(uids)

    def contains(self, uid: int) -> bool:
        return self._map.contains(uid)

    def holds(self, uids: np.ndarray) -> np.ndarray:
        return self._map.holds(uids)

    def evict(self, uids: np.ndarray) -> None:
        self._map.release(uids)

    def __len__(self) -> int:
        return self._map.used
