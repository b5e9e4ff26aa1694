"""Top-k spans: the k best of each row of (primary, secondary) [B, H, n] fp32 under kvtier.policies.rank_spans'
order (primary desc, then secondary desc, then id asc), returned as ids [B, Hsel, k] int64 ascending, optionally
after merging the heads (primary summed or maxed over H, secondary maxed) into one row per sequence.

Each span gets one int64 rank key, primary's order-preserving bits over secondary's, so ties left are exact ties,
which go to the lower id. `_block_keys_kernel` (one program per block of a row) writes the keys and its block's
K_PAD largest; `_select_kernel` (one program per row) sorts those candidates to find the k-th largest key T, then
keeps every key > T and the lowest ids of those == T, writing them in id order.

As in kernels/scoring.py, block sizes depend on n_spans only through its bucket (`span_bucket`, see `top_k_blocks`)
and the kernels take the sizes that change with the context as runtime integers (`do_not_specialize`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvtier.policies import best_spans

from .scoring import require_same_device, span_bucket

MERGES = (None, "sum", "max")
BLOCK = 2048  # spans per _block_keys_kernel program (at least K_PAD)
MAX_CANDIDATES = 16384  # keys _select_kernel sorts at once; rows with more spans get larger blocks
SELECT_CHUNK = 4096  # keys per step of _select_kernel's pass over the row
_NO_KEY = tl.constexpr(-(2**63))  # below every rank key


@triton.jit
def _ordered_bits(x):
    """fp32 -> int32 in the same signed order (-0.0 and 0.0 equal, as torch's sort compares them)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit(do_not_specialize=["n_spans", "n_blocks"])
def _block_keys_kernel(
    primary, secondary, keys, candidates,
    in_heads, n_spans, n_blocks,
    MERGE: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
):
    """Program (block of BLOCK_N spans, output row). Reads primary/secondary [B, H, n] (contiguous), of the row's
    H = in_heads heads when MERGE, else of its own head; writes keys [rows, n] int64 and its block's K_PAD largest
    keys, descending, into candidates [rows, n_blocks, K_PAD]."""
    block = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = n < n_spans
    if MERGE is None:
        rank = tl.load(primary + row * n_spans + n, mask=valid)
        tiebreak = tl.load(secondary + row * n_spans + n, mask=valid)
    else:
        rank = tl.load(primary + row * in_heads * n_spans + n, mask=valid)
        tiebreak = tl.load(secondary + row * in_heads * n_spans + n, mask=valid)
        for head in range(1, in_heads):
            at = (row * in_heads + head) * n_spans + n
            if MERGE == "sum":
                rank += tl.load(primary + at, mask=valid)
            else:
                rank = tl.maximum(rank, tl.load(primary + at, mask=valid))
            tiebreak = tl.maximum(tiebreak, tl.load(secondary + at, mask=valid))
    key = _ordered_bits(rank).to(tl.int64) * 4294967296 + (_ordered_bits(tiebreak).to(tl.int64) + 2147483648)
    key = tl.where(valid, key, _NO_KEY)
    tl.store(keys + row * n_spans + n, key, mask=valid)
    best = tl.sort(key, descending=True)
    first = tl.arange(0, BLOCK_N)
    tl.store(candidates + (row * n_blocks + block) * K_PAD + first, best, mask=first < K_PAD)


@triton.jit(do_not_specialize=["n_spans", "k", "n_candidates"])
def _select_kernel(
    keys, candidates, out, n_spans, k, n_candidates,
    CANDIDATES_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    """Program = one row: candidates [n_candidates] -> the k-th largest key T; then one pass over keys [n] keeps
    keys > T and the first (k - #(> T)) keys == T, storing their ids in ascending order into out [rows, k] int64.
    Every key > T is among the candidates: a block holding one outside its top K_PAD would hold > k keys > T."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CANDIDATES_PAD)
    ranked = tl.sort(
        tl.load(candidates + row * n_candidates + c, mask=c < n_candidates, other=_NO_KEY), descending=True
    )
    threshold = tl.max(tl.where(c == k - 1, ranked, _NO_KEY), axis=0)
    ties_wanted = k - tl.sum((ranked > threshold).to(tl.int32), axis=0)
    taken = 0
    ties_seen = 0
    n = tl.arange(0, CHUNK)
    for start in range(0, n_spans, CHUNK):
        key = tl.load(keys + row * n_spans + start + n, mask=start + n < n_spans, other=_NO_KEY)
        tie = (key == threshold).to(tl.int32)
        keep = (key > threshold) | ((tie == 1) & (ties_seen + tl.cumsum(tie, axis=0) <= ties_wanted))
        kept = keep.to(tl.int32)
        at = taken + tl.cumsum(kept, axis=0) - 1
        tl.store(out + row * k + at, (start + n).to(tl.int64), mask=keep)
        taken += tl.sum(kept, axis=0)
        ties_seen += tl.sum(tie, axis=0)


def top_k_spans(
    primary: torch.Tensor,
    secondary: torch.Tensor,
    k: int,
    merge_heads: str | None = None,
    *,
    out: torch.Tensor | None = None,
    block_spans: int | None = None,
) -> torch.Tensor:
    """primary, secondary [B, H, n] fp32 -> ids [B, Hsel, k'] int64 ascending, k' = min(k, n); Hsel = H, or 1 when
    merge_heads is "sum" / "max" (how primary merges over heads; secondary always by max). Written into `out` when
    given. block_spans: spans per first-stage program (default BLOCK, grown so the candidates stay sortable)."""
    _validate(primary, secondary, k, merge_heads, out)
    batch, heads, n_spans = primary.shape
    rows = batch * (heads if merge_heads is None else 1)
    k = min(k, n_spans)
    if out is None:
        out = torch.empty(batch, rows // batch, k, dtype=torch.int64, device=primary.device)  # [B, Hsel, k]
    if k == 0:
        return out
    blocks = top_k_blocks(n_spans, k, block_spans)
    n_blocks = triton.cdiv(n_spans, blocks.block_n)
    keys = torch.empty(rows, n_spans, dtype=torch.int64, device=primary.device)  # one rank key per span
    candidates = torch.empty(rows, n_blocks, blocks.k_pad, dtype=torch.int64, device=primary.device)  # blocks' best
    _block_keys_kernel[(n_blocks, rows)](
        primary, secondary, keys, candidates, heads, n_spans, n_blocks,
        MERGE=merge_heads, BLOCK_N=blocks.block_n, K_PAD=blocks.k_pad, num_warps=8,
    )
    _select_kernel[(rows,)](
        keys, candidates, out, n_spans, k, n_blocks * blocks.k_pad,
        CANDIDATES_PAD=blocks.candidates_pad, CHUNK=blocks.chunk, num_warps=8,
    )
    return out


class TopKBlocks(NamedTuple):
    """The tile sizes of top_k_spans for one span bucket."""

    k_pad: int  # candidates each first-stage block keeps
    block_n: int  # spans per first-stage program
    candidates_pad: int  # all blocks' candidates, padded
    chunk: int  # keys per step of the final pass


def top_k_blocks(n_spans: int, k: int, block_spans: int | None = None) -> TopKBlocks:
    """Tile sizes of a top_k_spans call taking k <= n_spans of n_spans >= 1 spans; block_spans: spans per
    first-stage program (default BLOCK, grown so the candidates stay sortable)."""
    bucket = span_bucket(n_spans)
    k_pad = triton.next_power_of_2(k)  # k = min(top_k, n_spans): its power of two is fixed by the bucket
    block_n = max(k_pad, min(triton.next_power_of_2(block_spans or BLOCK), bucket))
    while block_n < bucket and bucket // block_n * k_pad > MAX_CANDIDATES:
        block_n *= 2
    candidates_pad = triton.cdiv(bucket, block_n) * k_pad  # >= the blocks' candidates of any n_spans in the bucket
    return TopKBlocks(k_pad, block_n, candidates_pad, min(SELECT_CHUNK, bucket))


def top_k_spans_reference(
    primary: torch.Tensor,
    secondary: torch.Tensor,
    k: int,
    merge_heads: str | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """top_k_spans through Policy.select's PyTorch step (kvtier.policies.best_spans)."""
    _validate(primary, secondary, k, merge_heads, out, need_triton_device=False)
    ids = best_spans(primary, secondary, k, merge_heads)
    if out is None:
        return ids
    return out.copy_(ids)


def _validate(primary, secondary, k, merge_heads, out, need_triton_device=True) -> None:
    if merge_heads not in MERGES:
        raise ValueError(f"merge_heads must be one of {MERGES}, got {merge_heads!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    for name, tensor in (("primary", primary), ("secondary", secondary)):
        if tensor.dim() != 3 or tensor.dtype != torch.float32 or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [B, H, n] tensor, got {tuple(tensor.shape)} "
                             f"{tensor.dtype}{'' if tensor.is_contiguous() else ' (not contiguous)'}")
    if secondary.shape != primary.shape or secondary.device != primary.device:
        raise ValueError(f"primary {tuple(primary.shape)} on {primary.device} and secondary {tuple(secondary.shape)} "
                         f"on {secondary.device} must match")
    require_same_device({"primary": primary}, need_triton_device)
    if out is not None:
        batch, heads, n_spans = primary.shape
        shape = (batch, heads if merge_heads is None else 1, min(k, n_spans))
        if out.shape != shape or out.dtype != torch.int64 or not out.is_contiguous() or out.device != primary.device:
            raise ValueError(f"out must be a contiguous int64 {list(shape)} tensor on {primary.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
