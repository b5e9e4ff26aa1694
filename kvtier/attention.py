"""One attention call over a ReAttention scope: query chunks -> ingest -> select -> gather -> rotary -> attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier.layer import ReAttentionLayer
from kvtier.rotary import ScopeRotary


def scope_attention(
    layer: ReAttentionLayer, rotary: ScopeRotary, query: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """query [B, Hq, q, D] pre-RoPE, the layer holding this forward's q new K/V -> output [B, q, Hq, D].

    The queries go in chunks of `chunk_size`; each chunk seals what left the local window, selects its own spans and
    attends to `[global | spans | local ending with the chunk]` at positions 0..L-1, its queries at L-c..L-1.
    """
    keys, values = layer.take_pending()  # [B, Hkv, q, D]
    batch, q_heads, n_queries, head_dim = query.shape
    chunk = layer.config.chunk_size
    if n_queries <= chunk:  # decode steps and short prompts: one chunk, no output buffer to fill
        return _chunk_attention(layer, rotary, query, keys, values, scaling)
    out = query.new_empty(batch, n_queries, q_heads, head_dim)  # [B, q, Hq, D], the layout the model reshapes
    for start in range(0, n_queries, chunk):
        end = min(start + chunk, n_queries)
        chunk_kv = keys[:, :, start:end], values[:, :, start:end]
        out[:, start:end] = _chunk_attention(layer, rotary, query[:, :, start:end], *chunk_kv, scaling)
    return out


def _chunk_attention(layer: ReAttentionLayer, rotary: ScopeRotary, query: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """One query chunk [B, Hq, c, D] with its new K/V [B, Hkv, c, D]: ingest, select its spans, attend to
    `[global | spans | local ending with the chunk]` -> [B, c, Hq, D]."""
    layer.ingest(keys, values)
    rotated_keys, scope_values = layer.gather_scope(layer.select(query), rotary)  # [B, Hkv, L, D]
    rotated_queries = rotary.rotate(query, rotated_keys.shape[2] - query.shape[2])
    return _attend(rotated_queries, rotated_keys, scope_values, scaling).transpose(1, 2)


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """SDPA with the queries aligned to the end of the keys (bottom-right causal) -> [B, Hq, c, D]."""
    n_queries, length = query.shape[2], keys.shape[2]
    mask = None
    if n_queries > 1:
        key_pos = torch.arange(length, device=query.device)
        query_pos = torch.arange(length - n_queries, length, device=query.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [c, L]
    return F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != keys.shape[1]
    )
