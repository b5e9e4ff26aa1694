"""The disk tier as one SpanStore: a loaded cache's file (read-only, spans 0..count-1) and the spill file (written in
the background), either, both or neither. A span is read from the file that holds it; new spans go to the spill file."""
from __future__ import annotations

import numpy as np
import torch

from kvtier.errors import TierFullError
from kvtier.tiers.disk import LmdbStore


class DiskTier:
    def __init__(self, spill: LmdbStore | None):
        self.spill = spill
        self.saved: LmdbStore | None = None  # a loaded cache's file (see attach_saved)

    def attach_saved(self, store: LmdbStore) -> None:
        self.saved = store

    def _stores(self) -> list[LmdbStore]:
        return [store for store in (self.saved, self.spill) if store is not None]

    # ---- the SpanStore protocol ---------------------------------------------------------------------------------
    def put(self, uids: np.ndarray, spans: torch.Tensor) -> None:
        """Queue spans [N, 2, Hkv, S, D] (a CPU tensor the spill file now owns) for writing."""
        if self.spill is None:
            raise TierFullError("the host tier is full and there is no disk tier: set disk_path, or raise host_budget")
        self.spill.put(uids, spans)

    def get_into(self, uids: np.ndarray, out: torch.Tensor) -> None:
        """Spans on disk -> out [N, 2, Hkv, S, D] on the host: those in the loaded file from it, the rest from the
        spill file."""
        in_saved = self.saved.holds(uids) if self.saved is not None else np.zeros(len(uids), dtype=bool)
        for store, part in ((self.saved, in_saved), (self.spill, ~in_saved)):
            if not part.any():
                continue
            if part.all():
                store.get_into(uids, out)
            else:
                rows = torch.empty((int(part.sum()), *out.shape[1:]), dtype=out.dtype)  # [n, 2, Hkv, S, D]
                store.get_into(uids[part], rows)
                out[torch.from_numpy(np.flatnonzero(part))] = rows

    def contains(self, uid: int) -> bool:
        return any(store.contains(uid) for store in self._stores())

    def holds(self, uids: np.ndarray) -> np.ndarray:
        held = np.zeros(len(uids), dtype=bool)
        for store in self._stores():
            held |= store.holds(uids)
        return held

    def evict(self, uids: np.ndarray) -> None:
        """Delete the spill file's copies of those uids it holds (a loaded file is never changed)."""
        doomed = uids[self.spill.holds(uids)] if self.spill is not None else uids[:0]
        if len(doomed):
            self.spill.evict(doomed)

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in self._stores())

    # ---- the spill file's background writes ---------------------------------------------------------------------
    def over_budget(self, size: int) -> bool:
        """Whether `size` more bytes would pass disk_budget."""
        budget = None if self.spill is None else self.spill.budget
        return budget is not None and self.spill.nbytes + size > budget

    def poll(self) -> np.ndarray:
        """uids whose spill records committed since the last poll."""
        return self.spill.poll() if self.spill is not None else np.empty(0, dtype=np.int64)

    def pending(self) -> int:
        """Writes queued and not yet committed."""
        return self.spill.pending() if self.spill is not None else 0

    def wait_any(self) -> np.ndarray:
        """Block until the oldest queued write committed -> uids committed since the last poll."""
        return self.spill.wait_any()

    @property
    def wait_s(self) -> float:
        """Time spent waiting on reads and writes."""
        return sum(store.wait_s for store in self._stores())

    def close(self) -> None:
        for store in self._stores():
            store.close()
