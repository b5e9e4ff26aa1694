"""Consensus scoring: every span's best key score for every (query head, query) of the observation window, as
kvtier.policies' ConsensusPolicy.span_best_scores computes it: queries [B, Hkv, g, w, D] (centred, grouped by KV head)
. keys [B, Hkv, n, S, D] (the span table: each span's full keys) -> best [B, Hkv, g, w, n] fp32, the max over each
span's S keys. Products exact in fp32 (bf16 / fp16 on tensor cores; fp32 with "ieee", never tf32), fp32 sums.

Kernel: `_span_best_scores_kernel`, one program per (block of BLOCK_N spans, sequence x KV head, tile of rows), loads
its rows, the group's g*w (head, query) pairs padded to a power of two (one tile up to MAX_ROWS rows and
QUERY_TILE_BYTES), once; then per DOT_SPANS spans of its block one tl.dot against their keys and a max over each
span's S keys in registers. It writes only the [g*w, BLOCK_N] maxima, where the PyTorch path materialises the score
of every key.

Compiled variants: every block size depends on n_spans only through its power-of-two bucket (`window_blocks`), and
the kernel takes the sizes that change with the context or the window (n_spans, w, g*w) as plain runtime integers
(`do_not_specialize`), so a growing context compiles one variant per bucket up to the largest BLOCK_N, then no more.
The strides stay specialised, as in kernels/scoring.py: multiples of head_dim, fixed by the layout.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvtier.policies import ConsensusPolicy

from .scoring import _dot_t, _interpreting, _operand, require_same_device, span_bucket

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCORE_TILE = 8192  # fp32 scores one tl.dot produces (rows x keys): its accumulator, in registers
MAX_ROWS = 256  # (head, query) rows per program; a larger group's rows are split over programs
QUERY_TILE_BYTES = 64 * 1024  # the rows' queries one program holds (as computed: fp32 when upcast), at most
KEY_TILE_BYTES = 16 * 1024  # the keys of one tl.dot (as computed), at most
WIDE_TILE_BYTES = 32 * 1024  # a query tile above this takes 8 warps, not 4 (no register spills at D 128, sm_90)
MAX_BLOCK_N = 64  # spans per program at most
BLOCKS_PER_ROW = 64  # a large context is cut into at least this many blocks per (sequence, KV head)


@triton.jit(do_not_specialize=["n_queries", "n_rows", "n_spans"])
def _span_best_scores_kernel(
    queries, q_stride_b, q_stride_h, q_stride_g, q_stride_w,
    keys, k_stride_b, k_stride_h, k_stride_n, k_stride_s,
    best,
    kv_heads, n_queries, n_rows, n_spans,
    S: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_SPANS: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (block of BLOCK_N spans, b * kv_heads + KV head, tile of BLOCK_R rows); row r = (head in group) *
    n_queries + query. Writes best [B * Hkv, n_rows, n_spans] at its rows and spans."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    kv_head = (bh % kv_heads).to(tl.int64)
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_valid = r < n_rows
    d = tl.arange(0, D_PAD)
    d_valid = d < D
    row_offsets = (r // n_queries).to(tl.int64) * q_stride_g + (r % n_queries).to(tl.int64) * q_stride_w
    q_ptrs = queries + b * q_stride_b + kv_head * q_stride_h + row_offsets[:, None] + d[None, :]
    q = _operand(tl.load(q_ptrs, mask=r_valid[:, None] & d_valid[None, :], other=0.0), UPCAST)  # [BLOCK_R, D_PAD]

    m = tl.arange(0, DOT_SPANS * S_PAD)  # the keys of one tl.dot: key m % S_PAD of span m // S_PAD
    m_span, m_key = m // S_PAD, m % S_PAD
    row_keys = keys + b * k_stride_b + kv_head * k_stride_h
    out_rows = best + (bh.to(tl.int64) * n_rows + r)[:, None] * n_spans  # [BLOCK_R, 1]
    first_span = block * BLOCK_N
    for step in range(0, tl.minimum(BLOCK_N, n_spans - first_span), DOT_SPANS):
        span = first_span + step + m_span  # [DOT_SPANS * S_PAD]
        k_valid = (span < n_spans) & (m_key < S)
        k_ptrs = row_keys + span.to(tl.int64)[:, None] * k_stride_n + m_key[:, None] * k_stride_s + d[None, :]
        k = _operand(tl.load(k_ptrs, mask=k_valid[:, None] & d_valid[None, :], other=0.0), UPCAST)
        scores = tl.where(k_valid[None, :], _dot_t(q, k, PRECISION), float("-inf"))  # [BLOCK_R, DOT_SPANS*S_PAD]
        per_span = tl.max(tl.reshape(scores, [BLOCK_R, DOT_SPANS, S_PAD]), axis=2)  # [BLOCK_R, DOT_SPANS]
        n = first_span + step + tl.arange(0, DOT_SPANS)
        tl.store(out_rows + n[None, :], per_span, mask=r_valid[:, None] & (n < n_spans)[None, :])


class WindowBlocks(NamedTuple):
    """The tile sizes of span_best_scores for one span bucket."""

    s_pad: int  # keys per span, padded
    d_pad: int  # head_dim, padded
    block_r: int  # (head, query) rows per program
    dot_spans: int  # spans per tl.dot
    block_n: int  # spans per program, a multiple of dot_spans
    num_warps: int  # per program


def window_blocks(n_spans: int, n_rows: int, span: int, dim: int, element_size: int, *,
                  block_spans: int | None = None, keys_per_dot: int | None = None) -> WindowBlocks:
    """Tile sizes of a span_best_scores call over n_spans spans of `span` keys of dim elements, for n_rows = g * w
    (head, query) rows, computed in elements of element_size bytes. keys_per_dot: keys per tl.dot (default:
    SCORE_TILE scores of it, KEY_TILE_BYTES at most); block_spans: spans per program (default: by the bucket of
    n_spans, at most MAX_BLOCK_N). Both rounded up to powers of two."""
    s_pad = triton.next_power_of_2(span)
    d_pad = max(16, triton.next_power_of_2(dim))
    block_r = min(MAX_ROWS, QUERY_TILE_BYTES // (d_pad * element_size), triton.next_power_of_2(n_rows))
    block_r = max(16, block_r)  # tl.dot needs >= 16 rows, keys and head_dim
    keys_by_tiles = min(SCORE_TILE // block_r, KEY_TILE_BYTES // (d_pad * element_size))
    keys = max(16, triton.next_power_of_2(keys_per_dot or keys_by_tiles))
    dot_spans = max(1, keys // s_pad)
    by_bucket = min(MAX_BLOCK_N, span_bucket(n_spans) // BLOCKS_PER_ROW)
    block_n = max(dot_spans, triton.next_power_of_2(block_spans or by_bucket))
    num_warps = 8 if block_r * d_pad * element_size > WIDE_TILE_BYTES else 4
    return WindowBlocks(s_pad, d_pad, block_r, dot_spans, block_n, num_warps)


def span_best_scores(queries: torch.Tensor, keys: torch.Tensor, *, block_spans: int | None = None,
                     keys_per_dot: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """queries [B, Hkv, g, w, D] (in the keys' dtype or fp32; any strides, unit stride along D), keys [B, Hkv, n, S, D]
    (bf16 / fp16 / fp32; any strides over B, Hkv, n, S, unit stride along D) -> best [B, Hkv, g, w, n] fp32: the
    max over each span's S keys of q . k, one launch. fp32 queries over lower-precision keys run in fp32 (the keys
    upcast exactly). block_spans, keys_per_dot: see window_blocks; num_warps: per program (default: window_blocks').
    """
    _validate(queries, keys)
    batch, kv_heads, group, n_queries, dim = queries.shape
    n_spans, span = keys.shape[2], keys.shape[3]
    best = torch.empty(batch, kv_heads, group, n_queries, n_spans, dtype=torch.float32, device=queries.device)
    if best.numel() == 0:
        return best
    n_rows = group * n_queries
    upcast = queries.dtype != keys.dtype or (_interpreting() and keys.dtype == torch.bfloat16)
    element_size = 4 if upcast else keys.element_size()
    blocks = window_blocks(n_spans, n_rows, span, dim, element_size, block_spans=block_spans,
                           keys_per_dot=keys_per_dot)
    grid = (triton.cdiv(n_spans, blocks.block_n), batch * kv_heads, triton.cdiv(n_rows, blocks.block_r))
    _span_best_scores_kernel[grid](
        queries, *queries.stride()[:4],
        keys, *keys.stride()[:4],
        best,
        kv_heads, n_queries, n_rows, n_spans,
        S=span, D=dim, S_PAD=blocks.s_pad, D_PAD=blocks.d_pad,
        BLOCK_R=blocks.block_r, DOT_SPANS=blocks.dot_spans, BLOCK_N=blocks.block_n,
        UPCAST=upcast, PRECISION="ieee" if upcast or keys.dtype == torch.float32 else "tf32",
        num_warps=num_warps or blocks.num_warps,
    )
    return best


def span_best_scores_reference(queries: torch.Tensor, keys: torch.Tensor, span_block: int = 1024) -> torch.Tensor:
    """span_best_scores through the policy's own PyTorch code (ConsensusPolicy.span_best_scores: an einsum and a max
    over S, span_block spans at a time, in the queries' dtype)."""
    _validate(queries, keys, need_triton_device=False)
    return ConsensusPolicy(span_block=span_block).span_best_scores(queries, keys)


def _validate(queries: torch.Tensor, keys: torch.Tensor, need_triton_device: bool = True) -> None:
    if queries.dim() != 5:
        raise ValueError(f"queries must be [B, Hkv, g, w, D], got shape {tuple(queries.shape)}")
    if keys.dim() != 5:
        raise ValueError(f"keys must be [B, Hkv, n, S, D], got shape {tuple(keys.shape)}")
    if queries.shape[:2] != keys.shape[:2] or queries.shape[4] != keys.shape[4]:
        raise ValueError(f"keys {tuple(keys.shape)} do not match queries {tuple(queries.shape)} "
                         "in batch, KV heads or head_dim")
    if keys.dtype not in DTYPES or queries.dtype not in (keys.dtype, torch.float32):
        raise ValueError(f"keys must be one dtype of {DTYPES} and queries that dtype or float32, "
                         f"got {queries.dtype} and {keys.dtype}")
    require_same_device({"queries": queries, "keys": keys}, need_triton_device)
    if queries.stride(4) != 1 or keys.stride(4) != 1:
        raise ValueError(f"queries and keys need unit stride along head_dim, got strides {queries.stride()} and "
                         f"{keys.stride()}")
