"""The slot pool on the model's device: one slot = one sealed span, K and V of all KV heads, span-major."""
from __future__ import annotations

import numpy as np
import torch

from kvtier.buffers import buffer, larger_buffer, upload
from kvtier.errors import TierFullError
from kvtier.tiers.base import SlotPool


class DevicePool(SlotPool):
    """Spans on the model's device, at most `capacity` of them (None: no limit); the allocation grows by doubling
    (kvtier.buffers.growth_target), so a budget is never exceeded and a small context does not reserve it all."""

    def __init__(self, span_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, capacity: int | None):
        super().__init__(capacity)
        first = 16 if capacity is None else min(16, capacity)
        self.data = buffer((first, *span_shape), dtype, device)  # [slots, 2, Hkv, S, D]

    def put(self, uids: np.ndarray, spans: torch.Tensor) -> None:
        """spans [N, 2, Hkv, S, D] on the device, written into the slots reserved for uids [N]."""
        slots = self.reserve(uids)  # first: it may grow (replace) self.data
        self.data.index_copy_(0, upload(slots, self.data.device), spans)

    def reserve(self, uids: np.ndarray) -> np.ndarray:
        """Slots [N] for uids [N], allocated but not written: the caller fills them (see Copies.host_to_pool)."""
        self._grow_to(self._map.created_after(len(uids)))  # first: a failed growth leaves the map as it was
        return self._map.assign(uids)

    def _grow_to(self, rows: int) -> None:
        have = self.data.shape[0]
        if rows <= have:
            return
        grown = larger_buffer(self.data, 0, rows, self.capacity)
        if grown is None:
            span_bytes = self.data[0].numel() * self.data.element_size()
            raise TierFullError(
                f"the GPU span pool cannot grow from {have} to {rows} spans on {self.data.device}: growing copies the "
                f"pool, which needs {(have + rows) * span_bytes / 2**30:.1f} GiB at once; set gpu_budget (e.g. "
                f"gpu_budget=\"{max(1, have * span_bytes // 2**30)}GiB\") so the pool is allocated once and further "
                "spans move to pinned host memory"
            )
        grown[:have] = self.data
        self.data = grown

    def take(self, uids: np.ndarray) -> torch.Tensor:
        """uids [N] -> a new tensor of their spans [N, 2, Hkv, S, D] on the device."""
        return self.data[upload(self.slots_of(uids), self.data.device)]

    def get_into(self, uids: np.ndarray, out: torch.Tensor) -> None:
        """out [N, 2, Hkv, S, D] on any device (a copy to the host waits for it)."""
        out.copy_(self.take(uids))

    def gather_heads(self, slots: torch.Tensor) -> torch.Tensor:
        """slots [B, Hkv, k] on the device -> [B, Hkv, k, 2, S, D], reading only the KV head each row asks for."""
        heads = torch.arange(slots.shape[1], device=slots.device)[None, :, None]
        return self.data[slots, :, heads]

    @property
    def nbytes(self) -> int:
        """Bytes allocated on the device (at most the budget)."""
        return self.data.numel() * self.data.element_size()
