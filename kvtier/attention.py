"""One attention call over a ReAttention scope: query chunks -> ingest -> select -> gather -> rotary -> attention."""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function

from kvtier import dispatch
from kvtier.flash import FlashKernel, choose_flash
from kvtier.layer import ReAttentionLayer
from kvtier.prefill import QueryChunk, chunk_bounds, padded_index, unpadded_positions
from kvtier.rotary import ScopeRotary

BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_CHUNK_GROUP_BYTES = 2**28  # the chunks of a forward attended at once hold at most this much scope K/V


def scope_attention(
    layer: ReAttentionLayer, rotary: ScopeRotary, query: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """query [B, Hq, q, D] pre-RoPE, the layer holding this forward's q new K/V -> output [B, q, Hq, D].

    The queries go in chunks of `chunk_size` (kvtier.prefill.chunk_bounds); each chunk seals what left the local
    window, selects its own spans and attends to `[global | spans | local ending with the chunk]` at positions
    0..L-1, its queries at L-c..L-1. Once the global region is full (in a prompt's first forward: after the chunk
    that fills it), the forward's remaining chunks are taken in and sealed at once and their spans selected together
    (kvtier.prefill: the same scopes, fewer launches); with SDPA, spans read where they lie and as many spans for
    every chunk, their scopes are gathered and attended at once too, else chunk by chunk.
    The attention backend is chosen first, so a backend that cannot run raises before the layer takes anything in.
    """
    batch, q_heads, n_queries, head_dim = query.shape
    flash = choose_flash(layer.config.attention_backend, query.device, query.dtype, head_dim, n_queries == 1)
    keys, values = layer.take_pending()  # [B, Hkv, q, D]
    bounds = chunk_bounds(layer.seen, n_queries, layer.config.chunk_size)
    if len(bounds) == 1:  # decode steps and short prompts: one chunk, no output buffer to fill
        return _chunk_attention(layer, rotary, query, keys, values, scaling, flash)
    out = None  # [B, q, Hq, D], the layout the model reshapes; made once a chunk goes alone
    for index, (start, end) in enumerate(bounds):
        # the rest at once once the global region is full (in a prompt's first forward: after its first chunk)
        plan = layer.plan_forward([(first - start, last - start) for first, last in bounds[index:]])
        if plan is not None:
            part = slice(start, n_queries)
            rest = _forward_at_once(layer, rotary, query[:, :, part], keys[:, :, part], values[:, :, part], plan,
                                    scaling, flash)
            if out is None:
                return rest
            out[:, part] = rest
            break
        if out is None:
            out = query.new_empty(batch, n_queries, q_heads, head_dim)
        chunk_kv = keys[:, :, start:end], values[:, :, start:end]
        out[:, start:end] = _chunk_attention(layer, rotary, query[:, :, start:end], *chunk_kv, scaling, flash)
    return out


def _forward_at_once(layer: ReAttentionLayer, rotary: ScopeRotary, query: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, plan: tuple[list[QueryChunk], int], scaling: float | None,
                     flash: FlashKernel | None) -> torch.Tensor:
    """A forward of several chunks taken in at once (plan_forward's plan): ingest and select for all chunks, then
    gather and attend for all of them together where _chunks_attention can, else chunk by chunk -> [B, q, Hq, D]."""
    chunks, sealed = plan
    with _phase(PHASES[0]):
        stream = layer.ingest_forward(keys, values, sealed)
    with _phase(PHASES[1]):
        chosen = layer.select_chunks(query, chunks)
    at_once = flash is None and layer.gathers_chunks_at_once()
    groups = _same_span_counts(chosen) if at_once else [slice(j, j + 1) for j in range(len(chunks))]
    if len(groups) == 1 and at_once:
        return _chunks_attention(layer, rotary, query, chunks, chosen, stream, scaling)
    batch, q_heads, n_queries, head_dim = query.shape
    out = query.new_empty(batch, n_queries, q_heads, head_dim)  # [B, q, Hq, D]
    for group in groups:
        first, last = chunks[group][0], chunks[group][-1]
        if group.stop - group.start > 1:
            out[:, first.start : last.end] = _chunks_attention(layer, rotary, query, chunks[group], chosen[group],
                                                               stream, scaling)
            continue
        local = stream[0][:, :, first.local], stream[1][:, :, first.local]
        out[:, first.start : first.end] = _scope_attention(layer, rotary, query[:, :, first.start : first.end],
                                                           chosen[group][0], scaling, flash, local)
    return out


def _same_span_counts(chosen: list[torch.Tensor]) -> list[slice]:
    """Each chunk's span ids [B, Hkv, k] -> the runs of consecutive chunks with as many spans (as in a prompt's first
    forward, whose first chunks have fewer than top_k spans to choose from), each attended at once."""
    groups, start = [], 0
    for index in range(1, len(chosen) + 1):
        if index == len(chosen) or chosen[index].shape[-1] != chosen[start].shape[-1]:
            groups.append(slice(start, index))
            start = index
    return groups


PHASES = ("kvtier.ingest", "kvtier.select", "kvtier.gather", "kvtier.attend")  # a chunk's steps, as profiled


def _chunk_attention(layer: ReAttentionLayer, rotary: ScopeRotary, query: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, scaling: float | None, flash: FlashKernel | None) -> torch.Tensor:
    """One query chunk [B, Hq, c, D] with its new K/V [B, Hkv, c, D]: ingest, select its spans, attend to
    `[global | spans | local ending with the chunk]` (with `flash`, else SDPA) -> [B, c, Hq, D]. Under a profiler each
    step is a labelled range (PHASES: ingest with sealing, selection, gather with rotary, attention)."""
    with _phase(PHASES[0]):
        layer.ingest(keys, values)
    with _phase(PHASES[1]):
        ids = layer.select(query)
    return _scope_attention(layer, rotary, query, ids, scaling, flash)


def _scope_attention(layer: ReAttentionLayer, rotary: ScopeRotary, query: torch.Tensor, ids: torch.Tensor,
                     scaling: float | None, flash: FlashKernel | None,
                     local: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """A chunk's queries [B, Hq, c, D] attend to `[global | spans ids [B, Hkv, k] | local window]` (`local`: its keys
    and values when not the layer's own) -> [B, c, Hq, D]."""
    with _phase(PHASES[2]):
        rotated_keys, scope_values = layer.gather_scope(ids, rotary, local)  # [B, Hkv, L, D]
        layer.scope_attended(rotated_keys, scope_values, query.shape[2])
        rotated_queries = dispatch.rotate(rotary, query, rotated_keys.shape[2] - query.shape[2], layer.use_kernels)
    with _phase(PHASES[3]):
        return _attend(rotated_queries, rotated_keys, scope_values, scaling, flash)


def _chunks_attention(layer: ReAttentionLayer, rotary: ScopeRotary, query: torch.Tensor, chunks: list[QueryChunk],
                      chosen: list[torch.Tensor], stream: tuple[torch.Tensor, torch.Tensor],
                      scaling: float | None) -> torch.Tensor:
    """Every chunk of a forward taken in at once attends to its scope in one gather and one SDPA call per group of
    chunks (_CHUNK_GROUP_BYTES of scope at most): query [B, Hq, q, D] pre-RoPE, chosen each chunk's span ids, stream
    the forward's `[local window | new tokens]` -> [B, q, Hq, D]. Each chunk's rows padded to the group's longest
    scope and query count, the padding masked."""
    batch, head_dim = query.shape[0], query.shape[3]
    scope_bytes = 2 * layer.kv_heads * layer.config.scope_bound * head_dim * query.element_size()
    group = max(1, _CHUNK_GROUP_BYTES // (batch * scope_bytes))
    parts = []
    for first in range(0, len(chunks), group):
        part = slice(first, first + group)
        parts.append(_group_attention(layer, rotary, query, chunks[part], chosen[part], stream, scaling))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _group_attention(layer: ReAttentionLayer, rotary: ScopeRotary, query: torch.Tensor, chunks: list[QueryChunk],
                     chosen: list[torch.Tensor], stream: tuple[torch.Tensor, torch.Tensor],
                     scaling: float | None) -> torch.Tensor:
    """_chunks_attention for consecutive chunks -> [B, their queries, Hq, D]."""
    batch, q_heads = query.shape[:2]
    m, device = len(chunks), query.device
    with _phase(PHASES[2]):
        keys, values, lengths = layer.gather_chunk_scopes(chosen, chunks, stream, rotary)  # [B*m, Hkv, Lmax, D]
        layer.scope_attended(keys, values, query.shape[2])  # a scope kept for static decode steps is stale now
        counts = [chunk.end - chunk.start for chunk in chunks]
        widest = max(counts)
        rows = query.index_select(2, padded_index(tuple((c.start, c.end) for c in chunks), widest, device))
        rows = rows.unflatten(2, (m, widest)).transpose(1, 2).flatten(0, 1)  # [B*m, Hq, widest, D]
        ends = tuple((length - count, length) for length, count in zip(lengths, counts))
        positions = padded_index(ends, widest, device).view(m, widest)  # each query's scope position
        rotated = rotary.rotate_rows(rows, positions.repeat(batch, 1))
        group = q_heads // layer.kv_heads
        key_positions = torch.arange(keys.shape[2], device=device)
        mask = (key_positions <= positions[:, :, None]).repeat(batch, group, 1)[:, None]  # [B*m, 1, g*widest, Lmax]
    with _phase(PHASES[3]):
        out = _attend(rotated, keys, values, scaling, mask=mask)  # [B*m, widest, Hq, D]
    real = unpadded_positions(tuple(counts), widest, device)
    return out.unflatten(0, (batch, m)).flatten(1, 2).index_select(1, real)  # [B, sum(counts), Hq, D]


def _phase(name: str):
    """A profiler range named `name` while a torch profiler runs, else nothing (a range costs a few microseconds)."""
    return record_function(name) if torch.autograd.profiler._is_profiler_enabled else contextlib.nullcontext()


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float | None,
            flash: FlashKernel | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """query [B, Hq, c, D], keys / values [B, Hkv, L, D], all rotated, the queries aligned to the end of the keys
    (bottom-right causal; or `mask` [B, 1, g*c, L] bool, rows as below, for SDPA) -> [B, c, Hq, D]: FlashAttention's
    kernel when `flash` is given, else SDPA.

    For SDPA the g query heads sharing a KV head become g*c query rows of that head (a view), so no backend needs GQA
    support; cuDNN's attention is left out: it builds a plan per key length, and the scope's length changes every
    step."""
    if flash is not None:
        return _flash_attend(flash, query, keys, values, scaling)
    batch, q_heads, n_queries, head_dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    rows = query.reshape(batch, kv_heads, group * n_queries, head_dim)  # [B, Hkv, g*c, D]
    if mask is None and n_queries > 1:
        mask = _bottom_right_mask(length, n_queries, group, query.device, torch.is_inference_mode_enabled())
    with sdpa_kernel(BACKENDS):
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=scaling)  # [B, Hkv, g*c, D]
    # any strides (flash attention's output is laid out [B, g*c, Hkv, D]): at most one copy into the model's layout
    out = out.unflatten(2, (group, n_queries)).permute(0, 3, 1, 2, 4)  # [B, c, Hkv, g, D]
    return out.reshape(batch, n_queries, q_heads, head_dim)


def _flash_attend(flash: FlashKernel, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  scaling: float | None) -> torch.Tensor:
    """_attend through FlashAttention: it takes the [B, c, Hq, D] / [B, L, Hkv, D] views as they are (only the last
    dimension must be contiguous; transposing keeps it so), GQA and the bottom-right alignment natively."""
    out = flash.function(query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                         softmax_scale=scaling, causal=True)
    return out[0] if isinstance(out, tuple) else out  # flash-attn-4 returns (out [B, c, Hq, D], lse)


@functools.lru_cache(maxsize=1)
def _bottom_right_mask(length: int, n_queries: int, group: int, device: torch.device, inference: bool) -> torch.Tensor:
    """[g*c, L] bool: query row h*c + t (head h of the group, query t) sees keys 0..L-c+t. Every layer of a forward
    attends a chunk with the same scope length, so the last mask is kept: built once per chunk, not once per layer
    (4 launches). `inference`: the mode it is built in, so an inference-mode tensor never meets autograd."""
    key_pos = torch.arange(length, device=device)
    query_pos = torch.arange(length - n_queries, length, device=device)
    return (key_pos[None, :] <= query_pos[:, None]).repeat(group, 1)
