"""`quest`: a span is summarised by the per-channel min and max of its pre-RoPE keys (Quest, ICML 2024); score =
the upper bound sum_d max(q_d * min_d, q_d * max_d) of any key's dot product with the query."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy


@dataclass
class QuestPolicy(Policy):
    aggregation: str = "vote"

    name = "quest"
    kernel_scoring = "bound"
    kernel_summary = "minmax"

    def summary_size(self, span_size: int) -> int:
        return 2

    def summarise(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.stack((keys.amin(dim=2), keys.amax(dim=2)), dim=2)  # [N, Hkv, 2, D]

    def candidate_scores(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        # max(q*lo, q*hi) = relu(q)*hi + min(q, 0)*lo, channel by channel: two matmuls, no [.., n, D] temporary
        upper = torch.einsum("bkgqd,bknd->bkgqn", queries.clamp(min=0), summaries[:, :, :, 1])
        lower = torch.einsum("bkgqd,bknd->bkgqn", queries.clamp(max=0), summaries[:, :, :, 0])
        return (upper + lower).unsqueeze(-1)
