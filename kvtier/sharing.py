"""Identical rows held once. `generate` repeats a prompt num_beams or num_return_sequences times before its prefill
(and a batch may hold one prompt twice); rows fed the same ids compute the same K/V, selections and outputs, so the
cache keeps one copy of them and hands each row its copy's output: the prompt is prefilled, selected over and stored
once. The first forward whose ids differ between rows that share (a decode step of beams or samples) gives each row
its own state again, by ReAttentionLayer.keep_rows: the spans stay shared by uid."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharedRows:
    rows: torch.Tensor  # [B] the held copy each row reads (on the ids' device)
    first: torch.Tensor  # [U] the first row of each held copy

    @classmethod
    def of(cls, input_ids: torch.Tensor | None) -> "SharedRows | None":
        """input_ids [B, q] of a cache's first forward -> how its identical rows share, or None when no two rows are
        the same (or the ids are unknown: embeddings were passed)."""
        if input_ids is None or input_ids.shape[0] < 2:
            return None
        distinct, rows = torch.unique(input_ids, dim=0, return_inverse=True)  # [U, q], [B]
        if distinct.shape[0] == input_ids.shape[0]:
            return None
        order = torch.arange(input_ids.shape[0], device=input_ids.device)
        first = torch.full((distinct.shape[0],), input_ids.shape[0], device=input_ids.device)  # [U]
        return cls(rows, first.scatter_reduce(0, rows, order, "amin"))

    def still_holds(self, input_ids: torch.Tensor | None) -> bool:
        """Whether a forward's ids [B, q] are the same in every row of each held copy (never, for embeddings)."""
        return input_ids is not None and torch.equal(input_ids, self.expand(self.distinct(input_ids)))

    def distinct(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, ...] -> the held copies' rows [U, ...]."""
        return rows.index_select(0, self.first)

    def expand(self, held: torch.Tensor) -> torch.Tensor:
        """The held copies' [U, ...] -> every row's [B, ...]."""
        return held.index_select(0, self.rows)
