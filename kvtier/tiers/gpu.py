"""The slot pool on the model's device: one slot = one sealed span, K and V of all KV heads, span-major."""
from __future__ import annotations

import torch

from kvtier.buffers import GrowableTensor


class SlotPool:
    def __init__(self, kv_heads: int, span_size: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        # [slots, 2 (K, V), Hkv, S, D]: a span is one contiguous transfer unit
        self._slots = GrowableTensor((0, 2, kv_heads, span_size, head_dim), 0, dtype, device)

    def put(self, spans: torch.Tensor) -> torch.Tensor:
        """spans [N, 2, Hkv, S, D] -> their slot ids [N] int64."""
        first = self._slots.length
        self._slots.append(spans)
        return torch.arange(first, first + spans.shape[0], device=spans.device)

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """slots [B, Hkv, k] (the span of each row and KV head) -> [B, Hkv, k, 2, S, D], one indexing op, reading
        only the KV head each row asks for."""
        heads = torch.arange(slots.shape[1], device=slots.device)[None, :, None]
        return self._slots.data[slots, :, heads]

    def __len__(self) -> int:
        return self._slots.length

    @property
    def nbytes(self) -> int:
        """Bytes resident (the allocation, not just the used slots)."""
        return self._slots.nbytes
