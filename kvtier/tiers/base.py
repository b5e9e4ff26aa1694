"""What every span store offers (the protocol the placement composes), and the uid -> slot map of the two pools.

A span is one sealed span of one layer and one sequence: K and V of all KV heads, `[2, Hkv, S, D]`, named by a uid
unique within its cache. Stores hold whole spans; batches of spans travel as `[N, 2, Hkv, S, D]` tensors.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from kvtier.buffers import GrowableArray


class SpanStore(Protocol):
    def put(self, uids: np.ndarray, spans: torch.Tensor) -> None:
        """Store spans [N, 2, Hkv, S, D] under uids [N]."""

    def get_into(self, uids: np.ndarray, out: torch.Tensor) -> None:
        """Copy the spans of uids [N] into out [N, 2, Hkv, S, D]."""

    def contains(self, uid: int) -> bool:
        """Whether the span of uid is held here (complete: copied, committed)."""

    def evict(self, uids: np.ndarray) -> None:
        """Forget the spans of uids (their room is reused)."""

    @property
    def nbytes(self) -> int:
        """Bytes this store holds now."""


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
        known = uids < len(self.slot_of.data)
        held = np.zeros(len(uids), dtype=bool)
        held[known] = self.slot_of.data[uids[known]] >= 0
        return held


class SlotPool:
    """What the GPU and host pools share: a SlotMap `map` deciding where each uid's span sits in the pool."""

    map: SlotMap

    def contains(self, uid: int) -> bool:
        return self.map.contains(uid)

    def evict(self, uids: np.ndarray) -> None:
        self.map.release(uids)

    def __len__(self) -> int:
        return self.map.used
