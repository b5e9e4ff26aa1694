"""The host pool: spans in page-locked (pinned) memory when CUDA is present, plain memory otherwise. It grows block by
block (pinning one huge buffer up front would stall for seconds), and a block is never moved once allocated, so
its address stays valid for the GPU to read directly."""
from __future__ import annotations

import numpy as np
import torch

from kvtier.buffers import buffer
from kvtier.tiers.base import SlotMap

FIRST_BLOCK_BYTES = 4 * 2**20  # blocks double from this size ...
MAX_BLOCK_BYTES = 256 * 2**20  # ... up to this one


def contiguous_runs(slots: np.ndarray, blocks: np.ndarray) -> list[tuple[int, int]]:
    """Split positions 0..N-1 of `slots` (in blocks `blocks`) into [start, end) runs of consecutive slots inside
    one block."""
    if not len(slots):
        return []
    step = (np.diff(slots) != 1) | (blocks[1:] != blocks[:-1])
    edges = np.concatenate(([0], np.flatnonzero(step) + 1, [len(slots)]))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


class HostPool:
    def __init__(self, span_shape: tuple[int, ...], dtype: torch.dtype, capacity: int | None, pinned: bool):
        self.map = SlotMap(capacity)
        self.span_shape, self.dtype, self.pinned = span_shape, dtype, pinned
        self.span_bytes = int(np.prod(span_shape)) * dtype.itemsize
        self.blocks: list[torch.Tensor] = []  # block i: [rows_i, 2, Hkv, S, D], rows doubling up to MAX_BLOCK_BYTES
        self.block_starts = np.zeros(1, dtype=np.int64)  # first slot of each block, then the end of the last

    def _grow_to(self, slots: int) -> None:
        while self.block_starts[-1] < slots:
            rows = max(1, min(MAX_BLOCK_BYTES, FIRST_BLOCK_BYTES << len(self.blocks)) // self.span_bytes)
            if self.map.capacity is not None:
                rows = min(rows, self.map.capacity - int(self.block_starts[-1]))
            self.blocks.append(buffer((rows, *self.span_shape), self.dtype, pin_memory=self.pinned))
            self.block_starts = np.append(self.block_starts, self.block_starts[-1] + rows)

    def locate(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """slots [N] -> (block index [N], row in the block [N])."""
        blocks = np.searchsorted(self.block_starts, slots, side="right") - 1
        return blocks, slots - self.block_starts[blocks]

    def put(self, uids: np.ndarray, spans: torch.Tensor) -> None:
        """spans [N, 2, Hkv, S, D] from the device or the host; from CUDA the copy is asynchronous on the current
        stream (the caller records an event before it drops the source)."""
        slots = self.map.assign(uids)
        self._grow_to(self.map.created)
        blocks, rows = self.locate(slots)
        for start, end in contiguous_runs(slots, blocks):
            first = int(rows[start])
            self.blocks[blocks[start]][first : first + end - start].copy_(spans[start:end], non_blocking=True)

    def get_into(self, uids: np.ndarray, out: torch.Tensor) -> None:
        """out [N, 2, Hkv, S, D] on the host (pinned staging for a later copy to the GPU): one indexing op per block
        touched."""
        blocks, rows = self.locate(self.map.lookup(uids))
        for block in np.unique(blocks):
            where = np.flatnonzero(blocks == block)
            out[torch.from_numpy(where)] = self.blocks[block][torch.from_numpy(rows[where])]

    def contains(self, uid: int) -> bool:
        return self.map.contains(uid)

    def evict(self, uids: np.ndarray) -> None:
        self.map.release(uids)

    def __len__(self) -> int:
        return self.map.used

    @property
    def nbytes(self) -> int:
        """Bytes allocated on the host (at most the budget)."""
        return sum(block.numel() * block.element_size() for block in self.blocks)
