"""`infllm`: a span is summarised by its `representatives` most central keys (InfLLM, 2024: the tokens the span's
own context attends to most; here, the keys most aligned with the span's mean key, since queries are gone at seal time);
score = the best representative's dot product with the query."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import Policy, dot_scores


@dataclass
class InfLLMPolicy(Policy):
    aggregation: str = "sum"
    representatives: int = 4

    name = "infllm"
    kernel_scoring = "dot"
    kernel_summary = "representatives"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.representatives, bool) or not isinstance(self.representatives, int) or self.representatives < 1:
            raise ValueError(f"infllm policy: representatives must be a positive integer, got {self.representatives!r}")

    def summary_size(self, span_size: int) -> int:
        return min(self.representatives, span_size)

    def kernel_summary_options(self) -> dict[str, Any]:
        return {"representatives": self.representatives}

    def summarise(self, keys: torch.Tensor) -> torch.Tensor:
        centre = keys.float().mean(dim=2, keepdim=True)  # [N, Hkv, 1, D]
        closeness = (keys.float() * centre).sum(-1)  # [N, Hkv, S]
        picks = closeness.topk(self.summary_size(keys.shape[2]), dim=-1).indices.sort(dim=-1).values
        return keys.gather(2, picks.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))

    def candidate_scores(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        return dot_scores(queries, summaries)
