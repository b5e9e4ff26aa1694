"""`mean`: a span is summarised by its mean pre-RoPE key; score = query . mean key."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, dot_scores


@dataclass
class MeanPolicy(Policy):
    aggregation: str = "max"

    name = "mean"
    kernel_scoring = "dot"
    kernel_summary = "mean"

    def summary_size(self, span_size: int) -> int:
        return 1

    def summarise(self, keys: torch.Tensor) -> torch.Tensor:
        return keys.float().mean(dim=2, keepdim=True).to(keys.dtype)

    def candidate_scores(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        return dot_scores(queries, summaries)
