"""Tensor parallelism (transformers' `tp_plan="auto"` under torchrun): each rank's attention computes a slice of the
heads, so each rank's cache holds the K/V of its own KV heads (a contiguous block of them, in rank order). A selection
shared by all heads needs every head's span scores: `HeadShards.gather` brings the [B, Hkv, n] scores of every rank
to every rank, one all-gather per layer and query chunk, and the merge over heads then runs as on one device, in the
same order, so every rank selects the spans one device would. `per_kv_head=True` selects from each rank's own heads,
with no communication."""
from __future__ import annotations

import torch
import torch.distributed as dist


class HeadShards:
    """The process group over which the attention heads are split, as the selection sees it."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.ranks = dist.get_world_size(group)

    def gather(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [B, h, n] of this rank's h KV heads -> [B, ranks * h, n] of every rank's, in head order."""
        parts = [torch.empty_like(scores) for _ in range(self.ranks)]
        dist.all_gather(parts, scores.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def __deepcopy__(self, memo) -> "HeadShards":
        return self  # a process group is not copied: a cloned row stream (kvtier.rows) shares it
