"""Padded batches: each row of a left-padded batch runs as its own one-row stream of layers, with its own policy, and
its pads never reach it.

A row's stream sees only the row's real tokens, so its global region starts at its first token, its positions count
no pad, and no pad is sealed, selected or attended; each row selects its own spans, as in an unpadded batch. The
model's projections and MLPs still run on the whole batch at once; only the scope attention runs row by row. All rows
share the cache's placement (one span pool and one set of budgets)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from kvtier.attention import scope_attention
from kvtier.layer import GrowingLayer, PlacementSource, ReAttentionLayer, tokens_to_crop
from kvtier.policies import Policy
from kvtier.rotary import ScopeRotary


@dataclass
class RowStream:
    """One row of a padded batch: a one-row ReAttentionLayer per model layer, sharing the row's own policy (a policy
    that votes across layers keeps one row's votes apart from another's)."""

    layers: list[ReAttentionLayer]
    policy: Policy

    @classmethod
    def new(cls, config, policy: Policy, placement_source: PlacementSource, num_layers: int) -> "RowStream":
        return cls([ReAttentionLayer(config, policy, placement_source, index) for index in range(num_layers)], policy)

    def clone(self) -> "RowStream":
        """An independent copy (a beam that forks): its own regions, tables and policy state; the spans stay shared in
        the placement, as the copy refers to them by uid."""
        shared = {id(layer.placement_source): layer.placement_source for layer in self.layers}
        shared |= {id(layer.config): layer.config for layer in self.layers}
        shared |= {id(layer.placement): layer.placement for layer in self.layers if layer.is_initialized}
        return copy.deepcopy(self, memo=shared)


def follow_rows(rows: list[RowStream], index: list[int]) -> None:
    """Make row i old row index[i] in place (beams, repeats, a selection): a row named again is cloned, so rows that
    descend from one row go on independently (sharing its spans)."""
    taken: set[int] = set()
    followed = []
    for source in index:
        followed.append(rows[source].clone() if source in taken else rows[source])
        taken.add(source)
    rows[:] = followed


class PaddedLayer(GrowingLayer):
    """One model layer of a padded batch, as transformers sees it: counts every column (pads too, as the attention
    mask and cache positions do) and hands each row's real K/V and queries to that row's stream."""

    is_croppable = True

    def __init__(self, rows: list[RowStream], index: int):
        super().__init__()
        self.rows = rows  # the cache's list of row streams (shared by every PaddedLayer, reordered in place)
        self.index = index
        self.seen = 0  # columns fed, pads included
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stash the forward's new K/V [B, Hkv, q, D] (pads included) for the attention call. Returns them unchanged."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending is not None:
            raise RuntimeError("PaddedLayer.update was called twice without an attention call in between")
        self._pending = (key_states, value_states)
        self.seen += key_states.shape[2]
        return key_states, value_states

    def attend(self, rotary: ScopeRotary, query: torch.Tensor, scaling: float | None, new_pads: list[int]) -> torch.Tensor:
        """query [B, Hq, q, D] pre-RoPE, new_pads [B] (pads among the q new tokens of each row) -> [B, q, Hq, D]: each
        row's real queries attend over its own scope; a pad's output is 0 (no real token ever reads it)."""
        keys, values = self._pending
        self._pending = None
        batch, q_heads, n_queries, head_dim = query.shape
        out = query.new_zeros(batch, n_queries, q_heads, head_dim)  # [B, q, Hq, D]
        for row, pads in enumerate(new_pads):
            if pads == n_queries:
                continue
            layer = self.rows[row].layers[self.index]
            layer.update(keys[row : row + 1, :, pads:], values[row : row + 1, :, pads:])
            out[row : row + 1, pads:] = scope_attention(layer, rotary, query[row : row + 1, :, pads:], scaling)
        return out

    def crop(self, max_length) -> None:
        """Remove the newest tokens from every row (they are real in every row: pads only lead), all rows or none
        (ReAttentionLayer.crop says what can go)."""
        count = tokens_to_crop(max_length, self.seen)
        if count <= 0 or not self.is_initialized:
            return
        for layer in self.row_layers():
            layer.check_removable(count)
        for layer in self.row_layers():
            layer.crop(-count)
        self.seen -= count

    def row_layers(self) -> list[ReAttentionLayer]:
        return [row.layers[self.index] for row in self.rows]

    @property
    def largest_scope(self) -> int:
        return max((layer.largest_scope for layer in self.row_layers()), default=0)

    def resident_bytes(self) -> int:
        return sum(layer.resident_bytes() for layer in self.row_layers())
