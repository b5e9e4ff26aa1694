"""`reattention`: the paper's selection. Each (query, head) votes with its top-4 middle *tokens* by raw pre-RoPE dot
product; a token's vote goes to the span holding it; the most-voted spans win. Exact top-k, GQA pairing h // group.
Its "summary" is the span's full keys, so every middle key stays on the model's device."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, dot_scores


@dataclass
class ReAttentionPolicy(Policy):
    aggregation: str = "vote"
    votes: int = 4

    name = "reattention"
    kernel_scoring = "dot"

    def summary_size(self, span_size: int) -> int:
        return span_size

    def summarise(self, keys: torch.Tensor) -> torch.Tensor:
        return keys.clone()

    def candidate_scores(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        return dot_scores(queries, summaries)
