"""Decode attention over a buffer of a static bound whose valid length lives on the device (flash decoding): one query
per query head, query [B, Hq, 1, D] . keys [B, Hkv, bound, D] -> out [B, 1, Hq, D], attending to key positions
0..length-1 only, where `length` is a [1] int64 tensor the host never reads, so that a CUDA graph replays the call at
any length (kvtier.fast_decode's static step). Query head h reads KV head h // (Hq // Hkv). Positions at or beyond
the length are never read: whatever they hold, NaN included, changes nothing.

Kernels: `_split_kernel`, one program per (split of SPLIT_KEYS keys, sequence x KV head), holds all g = Hq / Hkv
query heads of its KV head as one [G_PAD, D] tile and runs the online softmax over its split in blocks of BLOCK_K keys
(a tl.dot for the scores, one for the values; running max, sum and accumulator in fp32); a split that starts at or
beyond the length loops zero times and writes nothing. It writes each head's normalised partial output and its
log-sum-exp (base 2); `_combine_kernel`, one program per (sequence, query head), merges the splits that hold keys.

Compiled variants: the split count and the block sizes depend only on the bound and the shapes (`decode_blocks`), the
length only on the device, so a model compiles one variant per dtype, and the scratch buffers are sized by the bound
(inside a CUDA graph capture torch takes them from the graph's pool).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .scoring import _interpreting, _operand, require_same_device

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_K = 64  # keys per tl.dot
TARGET_PROGRAMS = 256  # splits x (sequence, KV head) aimed for: about two per SM of an H200
COMBINE_TILE = 8192  # partial outputs (splits x head_dim, fp32) one combining program holds; caps the split count
LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(
    query, q_stride_b, q_stride_h,
    keys, k_stride_b, k_stride_h, k_stride_t,
    values, v_stride_b, v_stride_h, v_stride_t,
    length, partial_out, partial_lse,
    kv_heads, group, bound, n_splits, qk_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_KEYS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (split, b * kv_heads + KV head). qk_scale: the softmax scale times log2(e). Writes partial_out
    [B * Hq, n_splits, D] fp32 (normalised) and partial_lse [B * Hq, n_splits] fp32 (log2 of the split's sum of
    exp2 scores) at its heads' rows, if its split holds keys."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    kv_head = (bh % kv_heads).to(tl.int64)
    n_keys = tl.minimum(tl.load(length), bound).to(tl.int32)
    start = split * SPLIT_KEYS
    end = tl.minimum(start + SPLIT_KEYS, n_keys)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    g_valid, d_valid = g < group, d < D
    head = kv_head * group + g  # [G_PAD] query heads
    q_ptrs = query + b * q_stride_b + head[:, None] * q_stride_h + d[None, :]
    q = _operand(tl.load(q_ptrs, mask=g_valid[:, None] & d_valid[None, :], other=0.0), UPCAST)  # [G_PAD, D_PAD]
    k_row = keys + b * k_stride_b + kv_head * k_stride_h
    v_row = values + b * v_stride_b + kv_head * v_stride_h
    running_max = tl.full([G_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for block in range(start, end, BLOCK_K):
        t = block + tl.arange(0, BLOCK_K)
        t_valid = t < end
        kv_mask = t_valid[:, None] & d_valid[None, :]
        t_offsets = t.to(tl.int64)[:, None]
        k = _operand(tl.load(k_row + t_offsets * k_stride_t + d[None, :], mask=kv_mask, other=0.0), UPCAST)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G_PAD, BLOCK_K], log2 units
        scores = tl.where(t_valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))  # finite: the block holds a valid key
        p = tl.math.exp2(scores - new_max[:, None])
        rescale = tl.math.exp2(running_max - new_max)
        v = _operand(tl.load(v_row + t_offsets * v_stride_t + d[None, :], mask=kv_mask, other=0.0), UPCAST)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        running_sum = running_sum * rescale + tl.sum(p, axis=1)
        running_max = new_max
    rows = (b * kv_heads + kv_head) * group + g  # [G_PAD] = b * Hq + head
    written = g_valid & (start + tl.zeros_like(g) < n_keys)  # [G_PAD]: the split holds keys
    out_ptrs = partial_out + (rows[:, None] * n_splits + split) * D + d[None, :]
    total = tl.where(running_sum > 0, running_sum, 1.0)  # 0 only where nothing is written
    tl.store(out_ptrs, acc / total[:, None], mask=written[:, None] & d_valid[None, :])
    tl.store(partial_lse + rows * n_splits + split, running_max + tl.math.log2(total), mask=written)


@triton.jit
def _combine_kernel(
    partial_out, partial_lse, length, out, out_stride_b, out_stride_h,
    q_heads, n_splits,
    D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, SPLIT_KEYS: tl.constexpr,
):
    """Program (b * Hq + query head): the splits holding keys, weighted by their sums -> out [B, 1, Hq, D]."""
    row = tl.program_id(0).to(tl.int64)
    b, head = row // q_heads, row % q_heads
    split = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    held = (split < n_splits) & (split * SPLIT_KEYS < tl.load(length))
    lse = tl.load(partial_lse + row * n_splits + split, mask=held, other=float("-inf"))  # [SPLITS_PAD]
    top = tl.max(lse, axis=0)
    weight = tl.where(held, tl.math.exp2(lse - top), 0.0)
    part_ptrs = partial_out + (row * n_splits + split[:, None]) * D + d[None, :]
    parts = tl.load(part_ptrs, mask=held[:, None] & (d < D)[None, :], other=0.0)  # [SPLITS_PAD, D_PAD]
    total = tl.sum(weight, axis=0)
    merged = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)  # length 0: zeros
    tl.store(out + b * out_stride_b + head * out_stride_h + d, merged.to(out.dtype.element_ty), mask=d < D)


class DecodeBlocks(NamedTuple):
    """The tile sizes and the split of a decode_attention call; static for a model (bound and shapes)."""

    g_pad: int  # query heads per KV head, padded
    d_pad: int  # head_dim, padded
    block_k: int  # keys per tl.dot
    split_keys: int  # keys per split, a multiple of block_k
    n_splits: int  # splits covering the bound


def decode_blocks(bound: int, rows: int, group: int, dim: int, *, block_k: int | None = None,
                  split_keys: int | None = None) -> DecodeBlocks:
    """Tile sizes for a bound of `bound` keys, rows = B * Hkv, `group` query heads per KV head of dim elements.
    block_k: keys per tl.dot (default BLOCK_K, rounded up to a power of two, at least 16); split_keys: keys per split
    (default: about TARGET_PROGRAMS programs, at most COMBINE_TILE // d_pad splits; rounded up to a multiple of
    block_k)."""
    d_pad = max(16, triton.next_power_of_2(dim))
    block_k = max(16, triton.next_power_of_2(block_k or BLOCK_K))
    if split_keys is None:
        splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, rows), COMBINE_TILE // d_pad))
        split_keys = triton.cdiv(bound, splits)
    split_keys = block_k * max(1, triton.cdiv(split_keys, block_k))
    return DecodeBlocks(max(16, triton.next_power_of_2(group)), d_pad, block_k, split_keys,
                        max(1, triton.cdiv(bound, split_keys)))


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor,
                     scale: float | None = None, *, block_k: int | None = None, split_keys: int | None = None,
                     num_warps: int = 4) -> torch.Tensor:
    """query [B, Hq, 1, D] (rotated), keys / values [B, Hkv, bound, D] (bf16 / fp16 / fp32, the query's dtype; any
    strides, unit stride along D), length [1] int64 on their device: the number of valid keys, 1..bound -> out
    [B, 1, Hq, D] in the query's dtype: softmax(q . k * scale) . v over key positions 0..length-1 (scale None:
    1/sqrt(D)). Two launches, no host read of length. block_k, split_keys: see decode_blocks."""
    _validate(query, keys, values, length)
    batch, q_heads, _, dim = query.shape
    kv_heads, bound = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    blocks = decode_blocks(bound, batch * kv_heads, group, dim, block_k=block_k, split_keys=split_keys)
    out = torch.empty(batch, 1, q_heads, dim, dtype=query.dtype, device=query.device)  # [B, 1, Hq, D]
    partial_out = torch.empty(batch * q_heads, blocks.n_splits, dim, dtype=torch.float32,
                              device=query.device)  # [B * Hq, n_splits, D]
    partial_lse = torch.empty(batch * q_heads, blocks.n_splits, dtype=torch.float32,
                              device=query.device)  # [B * Hq, n_splits]
    upcast = _interpreting() and query.dtype == torch.bfloat16
    scale = 1 / math.sqrt(dim) if scale is None else scale
    _split_kernel[(blocks.n_splits, batch * kv_heads)](
        query, query.stride(0), query.stride(1),
        keys, *keys.stride()[:3],
        values, *values.stride()[:3],
        length, partial_out, partial_lse,
        kv_heads, group, bound, blocks.n_splits, scale * LOG2E,
        D=dim, D_PAD=blocks.d_pad, G_PAD=blocks.g_pad, BLOCK_K=blocks.block_k, SPLIT_KEYS=blocks.split_keys,
        UPCAST=upcast, PRECISION="ieee" if query.dtype == torch.float32 or upcast else "tf32",
        num_warps=num_warps,
    )
    _combine_kernel[(batch * q_heads,)](
        partial_out, partial_lse, length, out, out.stride(0), out.stride(2),
        q_heads, blocks.n_splits,
        D=dim, D_PAD=blocks.d_pad, SPLITS_PAD=triton.next_power_of_2(blocks.n_splits),
        SPLIT_KEYS=blocks.split_keys,
    )
    return out


def decode_attention_reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """decode_attention through PyTorch, as kvtier.fast_decode's SDPA path runs it: the whole buffer with a boolean
    mask of the positions below length (so a NaN beyond it does reach the output here)."""
    _validate(query, keys, values, length, need_triton_device=False)
    batch, q_heads, _, dim = query.shape
    kv_heads, bound = keys.shape[1], keys.shape[2]
    rows = query.reshape(batch, kv_heads, q_heads // kv_heads, dim)  # [B, Hkv, g, D]
    visible = (torch.arange(bound, device=query.device) < length)[None]  # [1, bound]
    out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=visible, scale=scale)
    return out.reshape(batch, 1, q_heads, dim)


def _validate(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor,
              need_triton_device: bool = True) -> None:
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"query must be [B, Hq, 1, D], got shape {tuple(query.shape)}")
    if keys.dim() != 4 or values.shape != keys.shape:
        raise ValueError(f"keys and values must be one shape [B, Hkv, bound, D], got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    batch, q_heads, _, dim = query.shape
    if keys.shape[0] != batch or keys.shape[3] != dim or q_heads % keys.shape[1]:
        raise ValueError(f"keys {tuple(keys.shape)} do not match query {tuple(query.shape)} in batch, head_dim, "
                         "or a whole number of query heads per KV head")
    if query.dtype not in DTYPES or keys.dtype != query.dtype or values.dtype != query.dtype:
        raise ValueError(f"query, keys and values must be one dtype of {DTYPES}, got {query.dtype}, {keys.dtype} "
                         f"and {values.dtype}")
    if length.shape != (1,) or length.dtype != torch.long:
        raise ValueError(f"length must be a [1] int64 tensor, got {tuple(length.shape)} {length.dtype}")
    require_same_device({"query": query, "keys": keys, "values": values, "length": length}, need_triton_device)
    if query.stride(3) != 1 or keys.stride(3) != 1 or values.stride(3) != 1:
        raise ValueError(f"query, keys and values need unit stride along head_dim, got strides {query.stride()}, "
                         f"{keys.stride()} and {values.stride()}")
