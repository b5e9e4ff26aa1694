"""`streaming`: no middle at all; the scope is the global tokens plus the local window (StreamingLLM)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy


@dataclass
class StreamingPolicy(Policy):
    name = "streaming"

    def summary_size(self, span_size: int) -> int:
        return 0

    def summarise(self, keys: torch.Tensor) -> torch.Tensor:
        return keys[:, :, :0]

    def candidate_scores(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the streaming policy scores nothing")

    def select(self, queries: torch.Tensor, summaries: torch.Tensor, top_k: int, per_kv_head: bool) -> torch.Tensor:
        h_sel = summaries.shape[1] if per_kv_head else 1
        return torch.empty(queries.shape[0], h_sel, 0, dtype=torch.long, device=queries.device)
