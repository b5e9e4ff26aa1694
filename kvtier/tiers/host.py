"""The host pool: spans in page-locked (pinned) memory when CUDA is present, plain memory otherwise. It grows in
equal blocks (pinning one huge buffer up front would stall for seconds), and a block never moves once allocated,
so its address stays valid for the GPU to read directly: host slot h is row h % block_slots of block
h // block_slots (the layout kvtier.kernels.gather reads). Where PyTorch pins by cudaHostRegister (kvtier.allocator),
pinned blocks are allocated ahead of need on a background thread (kvtier.tiers.reserve), at most AHEAD_BLOCKS beyond
those holding spans; with cudaHostAlloc, which holds the driver's lock while it pins, a thread did not help in the run
measured (RESULTS.md section 25a) and the pool allocates each block when it needs it, after one warning."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from kvtier.allocator import PINNED_REGISTER, registers_pinned_pages
from kvtier.buffers import buffer
from kvtier.tiers.base import SlotPool
from kvtier.tiers.reserve import BlockReserve

BLOCK_BYTES = 256 * 2**20
AHEAD_BLOCKS = 8  # pinned blocks kept ready: 2 GiB, two 8K-token forwards' evictions of the Llama-3.1-8B shape


def contiguous_runs(slots: np.ndarray, blocks: np.ndarray) -> list[tuple[int, int]]:
    """Split positions 0..N-1 of `slots` (in blocks `blocks`) into [start, end) runs of consecutive slots inside
    one block."""
    if not len(slots):
        return []
    step = (np.diff(slots) != 1) | (blocks[1:] != blocks[:-1])
    edges = np.concatenate(([0], np.flatnonzero(step) + 1, [len(slots)]))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


class HostPool(SlotPool):
    def __init__(self, span_shape: tuple[int, ...], dtype: torch.dtype, capacity: int | None, pinned: bool,
                 ahead: int | None = None):
        """`ahead`: blocks allocated ahead of need on a thread (default AHEAD_BLOCKS when pinned by cudaHostRegister,
        else 0: each block allocated when needed)."""
        super().__init__(capacity)
        self.span_shape, self.dtype, self.pinned = span_shape, dtype, pinned
        span_bytes = int(np.prod(span_shape)) * dtype.itemsize
        self.block_slots = max(1, BLOCK_BYTES // span_bytes)
        if capacity is not None:
            self.block_slots = min(self.block_slots, capacity)
        self.blocks: list[torch.Tensor] = []  # each [block_slots, 2, Hkv, S, D]
        if ahead is None:
            ahead = AHEAD_BLOCKS if pinned and registers_pinned_pages() else 0
        limit = None if capacity is None else -(-capacity // self.block_slots)
        self._reserve = BlockReserve(self._new_block, ahead, limit) if ahead else None

    def _new_block(self) -> torch.Tensor:
        if self.pinned and not self.blocks and not registers_pinned_pages():
            warnings.warn(f"kvtier's host tier pins its blocks through cudaHostAlloc (2.6 GiB/s on an H200); set "
                          f"PYTORCH_CUDA_ALLOC_CONF={PINNED_REGISTER} before CUDA starts to pin 3.6x faster (the "
                          "`kvtier` command does)", stacklevel=2)
        return buffer((self.block_slots, *self.span_shape), self.dtype, pin_memory=self.pinned)

    def _grow_to(self, slots: int) -> None:
        while len(self.blocks) * self.block_slots < slots:
            self.blocks.append(self._new_block() if self._reserve is None else self._reserve.take())

    def _block_and_row(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """slots [N] -> (block index [N], row in the block [N])."""
        return np.divmod(slots, self.block_slots)

    def put(self, uids: np.ndarray, spans: torch.Tensor) -> None:
        """spans [N, 2, Hkv, S, D] from the device or the host; from CUDA the copy is asynchronous on the current
        stream (the caller records an event before it drops the source)."""
        slots = self._map.assign(uids)
        self._grow_to(self._map.created)
        blocks, rows = self._block_and_row(slots)
        for start, end in contiguous_runs(slots, blocks):
            first = int(rows[start])
            self.blocks[blocks[start]][first : first + end - start].copy_(spans[start:end], non_blocking=True)

    def get_into(self, uids: np.ndarray, out: torch.Tensor) -> None:
        """out [N, 2, Hkv, S, D] on the host (pinned staging for a later copy to the GPU): one indexing op per block
        touched."""
        blocks, rows = self._block_and_row(self.slots_of(uids))
        for block in np.unique(blocks):
            where = np.flatnonzero(blocks == block)
            out[torch.from_numpy(where)] = self.blocks[block][torch.from_numpy(rows[where])]

    @property
    def nbytes(self) -> int:
        """Bytes allocated on the host (at most the budget): the blocks in use and those the reserve holds ready."""
        block_bytes = self.block_slots * int(np.prod(self.span_shape)) * self.dtype.itemsize
        return (len(self.blocks) + (self._reserve.ready if self._reserve else 0)) * block_bytes
