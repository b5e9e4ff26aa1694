"""Span scoring: one pass over the summaries scores every (query, query head) of a chunk against every span and
aggregates per KV head into (primary, secondary) [B, Hkv, n] fp32, as kvtier.policies' Policy.aggregate does.

Summary kinds: "dot" (each of a span's c summary vectors is a candidate, score q . s: mean, infllm, reattention) and
"bound" (quest: c = 2, s[0] = per-channel min, s[1] = max; one candidate, sum_d max(q_d lo_d, q_d hi_d)
= relu(q) . hi + min(q, 0) . lo). Query head h reads KV head h // (Hq // Hkv). Products in fp32 (exact for bf16
inputs), fp32 accumulation.

Kernels: `_score_spans_kernel`, one program per (sequence, KV head, block of spans), reads its block of summaries
once and loops over the group's (head, query) rows; it writes the "max" / "sum" aggregates directly. For "vote" it
also writes each (head, query) row's best `votes` candidates within its block; `_count_votes_kernel`, one program per
block of rows, keeps each row's best `votes` overall and adds one vote per pick to the span holding it.

Compiled variants: every block size depends on n_spans only through its power-of-two bucket (`span_bucket`), and the
kernels take the sizes that change with the context or the step as plain runtime integers (`do_not_specialize`),
so a growing context compiles one variant per bucket, which kvtier.kernels.warmup can do ahead. The strides stay
specialised: every caller's are multiples of head_dim, fixed by the layout, and their divisibility lets loads
vectorise.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvtier.policies import AGGREGATIONS, MeanPolicy, QuestPolicy

KINDS = ("dot", "bound")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TILE_BYTES = 32 * 1024  # summary bytes one program loads: one tile in registers, enough programs to fill the GPU
VOTE_SCRATCH_BYTES = 256 * 1024 * 1024  # per-block vote picks kept between the two kernels; more queries: more launches
ROWS_PER_DOT = 64  # (head, query) rows scored per tl.dot
COUNT_TILE = 8192  # vote picks (rows x entries) one _count_votes_kernel program holds


@triton.jit(do_not_specialize=["n_queries", "n_spans", "n_blocks"])
def _score_spans_kernel(
    queries, q_stride_b, q_stride_h, q_stride_t,
    summaries, s_stride_b, s_stride_h, s_stride_n,
    primary, best,
    block_scores, block_spans,
    kv_heads, group, n_queries, n_spans, n_blocks,
    C: tl.constexpr, D: tl.constexpr, C_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BOUND: tl.constexpr, AGGREGATION: tl.constexpr,
    BLOCK_VOTES: tl.constexpr, ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (block of BLOCK_N spans, row b * kv_heads + KV head). Its candidates: BLOCK_M = BLOCK_N * C_PAD
    summary vectors (span-major; C_PAD = 1 for a bound); rows: r = (head in group) * n_queries + query.
    Writes best [B, Hkv, n] (and primary: the sum, or zeros on the first vote launch); for "vote" also
    block_scores / block_spans [B, Hkv, R, n_blocks, BLOCK_VOTES]: each row's best candidates in this block.
    ACCUMULATE: combine with what an earlier launch over other queries of the chunk wrote."""
    BLOCK_M: tl.constexpr = BLOCK_N * C_PAD
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    kv_head = (bh % kv_heads).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_span = block * BLOCK_N + m // C_PAD  # [BLOCK_M]
    m_valid = (m_span < n_spans) & (m % C_PAD < C)
    d = tl.arange(0, D_PAD)
    d_valid = d < D
    tile_mask = m_valid[:, None] & d_valid[None, :]
    spans = summaries + b * s_stride_b + kv_head * s_stride_h + m_span.to(tl.int64)[:, None] * s_stride_n
    if BOUND:  # [BLOCK_N, D_PAD] each: the per-channel min and max
        lo = _operand(tl.load(spans + d[None, :], mask=tile_mask, other=0.0), UPCAST)
        hi = _operand(tl.load(spans + D + d[None, :], mask=tile_mask, other=0.0), UPCAST)
    else:  # [BLOCK_M, D_PAD]: candidate m is summary vector m % C_PAD of span m_span
        tile = _operand(tl.load(spans + (m % C_PAD)[:, None] * D + d[None, :], mask=tile_mask, other=0.0), UPCAST)

    group_queries = queries + b * q_stride_b + kv_head * group * q_stride_h  # the group's first head
    n_rows = group * n_queries
    best_acc = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sum_acc = tl.zeros([BLOCK_N], tl.float32)
    for row0 in range(0, n_rows, BLOCK_R):
        r = row0 + tl.arange(0, BLOCK_R)
        r_valid = r < n_rows
        row_offsets = (r // n_queries).to(tl.int64) * q_stride_h + (r % n_queries).to(tl.int64) * q_stride_t
        q_mask = r_valid[:, None] & d_valid[None, :]
        q = _operand(tl.load(group_queries + row_offsets[:, None] + d[None, :], mask=q_mask, other=0.0), UPCAST)
        if BOUND:
            positive, negative = tl.maximum(q, 0.0).to(hi.dtype), tl.minimum(q, 0.0).to(lo.dtype)  # exact
            scores = _dot_t(positive, hi, PRECISION) + _dot_t(negative, lo, PRECISION)
        else:
            scores = _dot_t(q, tile, PRECISION)
        scores = tl.where(m_valid[None, :], scores, float("-inf"))  # [BLOCK_R, BLOCK_M] fp32
        per_span = tl.max(tl.reshape(scores, [BLOCK_R, BLOCK_N, C_PAD]), axis=2)  # [BLOCK_R, BLOCK_N]
        best_acc = tl.maximum(best_acc, tl.max(tl.where(r_valid[:, None], per_span, float("-inf")), axis=0))
        if AGGREGATION == "sum":
            sum_acc += tl.sum(tl.where(r_valid[:, None], per_span, 0.0), axis=0)
        if AGGREGATION == "vote":
            picks = ((bh * n_rows + r).to(tl.int64) * n_blocks + block) * BLOCK_VOTES  # [BLOCK_R]
            _store_row_tops(
                scores, block * BLOCK_N, block_scores + picks, block_spans + picks, r_valid, BLOCK_M, C_PAD, BLOCK_VOTES
            )

    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    out = bh.to(tl.int64) * n_spans + n
    n_valid = n < n_spans
    if ACCUMULATE:
        best_acc = tl.maximum(best_acc, tl.load(best + out, mask=n_valid))
    tl.store(best + out, best_acc, mask=n_valid)
    if AGGREGATION == "max":
        tl.store(primary + out, best_acc, mask=n_valid)
    if AGGREGATION == "sum":
        if ACCUMULATE:
            sum_acc += tl.load(primary + out, mask=n_valid)
        tl.store(primary + out, sum_acc, mask=n_valid)
    if AGGREGATION == "vote":
        if not ACCUMULATE:
            tl.store(primary + out, sum_acc, mask=n_valid)  # zeros: _count_votes_kernel adds the votes


@triton.jit
def _dot_t(a, b, PRECISION: tl.constexpr):
    """a [M, K] . b [N, K]^T -> [M, N] fp32: exact products (bf16 / fp16 on tensor cores; fp32 with PRECISION
    "ieee", never tf32), fp32 sums."""
    return tl.dot(a, tl.trans(b), input_precision=PRECISION)


@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    """UPCAST: to fp32 (exact), for Triton's interpreter, which computes on bf16 bit patterns as integers in tl.dot
    and tl.maximum."""
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_row_tops(scores, first_span, score_ptrs, span_ptrs, r_valid, BLOCK_M: tl.constexpr, C_PAD: tl.constexpr,
                    VOTES: tl.constexpr):
    """scores [BLOCK_R, BLOCK_M] of candidates (span first_span + m // C_PAD, vector m % C_PAD) -> for each row its
    VOTES best (score, span), best first."""
    m = tl.arange(0, BLOCK_M)[None, :]
    for v in tl.static_range(VOTES):
        top = tl.max(scores, axis=1)  # [BLOCK_R]
        at = tl.min(tl.where(scores == top[:, None], m, BLOCK_M), axis=1)
        tl.store(score_ptrs + v, top, mask=r_valid)
        tl.store(span_ptrs + v, first_span + at // C_PAD, mask=r_valid)
        scores = tl.where(m == at[:, None], float("-inf"), scores)


@triton.jit(do_not_specialize=["n_rows", "n_spans", "n_entries", "n_votes"])
def _count_votes_kernel(
    block_scores, block_spans, primary, n_rows, n_spans, n_entries, n_votes,
    VOTES: tl.constexpr, VOTES_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, CHUNK: tl.constexpr,
):
    """Program (block of BLOCK_ROWS (head, query) rows, b * Hkv + KV head): each row's n_entries = n_blocks *
    BLOCK_VOTES picks -> its VOTES best, best first; the first n_votes (<= VOTES) each add one vote to primary
    [B, Hkv, n] at the span holding it (a span may get several votes from one row)."""
    bh = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    r_valid = r < n_rows
    entries = (bh * n_rows + r).to(tl.int64)[:, None] * n_entries  # [BLOCK_ROWS, 1]
    slot = tl.arange(0, VOTES_PAD)[None, :]
    e = tl.arange(0, CHUNK)[None, :]
    kept = tl.full([BLOCK_ROWS, VOTES_PAD], float("-inf"), tl.float32)  # each row's best so far, and their spans
    kept_spans = tl.zeros([BLOCK_ROWS, VOTES_PAD], tl.int32)
    for start in range(0, n_entries, CHUNK):
        valid = r_valid[:, None] & (start + e < n_entries)
        scores = tl.load(block_scores + entries + start + e, mask=valid, other=float("-inf"))  # [BLOCK_ROWS, CHUNK]
        spans = tl.load(block_spans + entries + start + e, mask=valid, other=0)
        merged = tl.full([BLOCK_ROWS, VOTES_PAD], float("-inf"), tl.float32)
        merged_spans = tl.zeros([BLOCK_ROWS, VOTES_PAD], tl.int32)
        for v in tl.static_range(VOTES):  # merge: the best of (kept, this chunk), one at a time
            top_new = tl.max(scores, axis=1)[:, None]  # [BLOCK_ROWS, 1]
            top_kept = tl.max(kept, axis=1)[:, None]
            from_new = top_new > top_kept
            first_new = tl.min(tl.where(scores == top_new, e, CHUNK), axis=1)[:, None]
            first_kept = tl.min(tl.where(kept == top_kept, slot, VOTES_PAD), axis=1)[:, None]
            at_new = tl.where(from_new, first_new, CHUNK)  # one of the two is out of range: taken from the other
            at_kept = tl.where(from_new, VOTES_PAD, first_kept)
            span = tl.sum(tl.where(e == at_new, spans, 0), axis=1)
            span += tl.sum(tl.where(slot == at_kept, kept_spans, 0), axis=1)
            merged = tl.where(slot == v, tl.maximum(top_new, top_kept), merged)
            merged_spans = tl.where(slot == v, span[:, None], merged_spans)
            scores = tl.where(e == at_new, float("-inf"), scores)
            kept = tl.where(slot == at_kept, float("-inf"), kept)
        kept, kept_spans = merged, merged_spans
    votes = tl.full([BLOCK_ROWS, VOTES_PAD], 1.0, tl.float32)
    tl.atomic_add(primary + bh * n_spans + kept_spans, votes, mask=r_valid[:, None] & (slot < n_votes))


def score_spans(
    queries: torch.Tensor,
    summaries: torch.Tensor,
    kind: str,
    aggregation: str,
    votes: int = 4,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_vectors: int | None = None,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """queries [B, Hq, q, D] pre-RoPE, summaries [B, Hkv, n, c, D] (same dtype; any strides over B, Hkv, n, the
    last two dims contiguous) -> (primary, secondary) [B, Hkv, n] fp32, written into `out` when given.
    block_vectors: summary vectors per program (default: TILE_BYTES of them); num_warps: per program."""
    _validate(queries, summaries, kind, aggregation, votes, out)
    batch, hq, n_queries, dim = queries.shape
    _, kv_heads, n_spans, c, _ = summaries.shape
    primary, best = out if out is not None else (
        torch.empty(batch, kv_heads, n_spans, dtype=torch.float32, device=queries.device) for _ in range(2)
    )  # each [B, Hkv, n]
    if n_spans == 0 or n_queries == 0:
        primary.fill_(0.0 if aggregation != "max" else float("-inf"))
        best.fill_(float("-inf"))
        return primary, best
    bound = kind == "bound"
    blocks = score_blocks(n_spans, c, dim, summaries.element_size(), bound, votes, block_vectors)
    n_blocks = triton.cdiv(n_spans, blocks.block_n)
    group = hq // kv_heads
    upcast = _interpreting() and queries.dtype == torch.bfloat16
    fp32_dot = upcast or queries.dtype == torch.float32
    queries_per_launch = launch_queries(batch, hq, n_queries, n_spans, blocks, aggregation)
    if aggregation == "vote":
        rows = group * queries_per_launch
        picks = (batch, kv_heads, rows, n_blocks, blocks.block_votes)  # each row's best candidates in each block
        block_scores = torch.empty(picks, dtype=torch.float32, device=queries.device)
        block_spans = torch.empty(picks, dtype=torch.int32, device=queries.device)
    else:
        block_scores = block_spans = best  # unused
    for start in range(0, n_queries, queries_per_launch):
        chunk = queries[:, :, start : start + queries_per_launch]  # [B, Hq, q', D]
        rows = group * chunk.shape[2]
        _score_spans_kernel[(n_blocks, batch * kv_heads)](
            chunk, *chunk.stride()[:3],
            summaries, *summaries.stride()[:3],
            primary, best,
            block_scores, block_spans,
            kv_heads, group, chunk.shape[2], n_spans, n_blocks,
            C=c, D=dim, C_PAD=blocks.c_pad, D_PAD=blocks.d_pad,
            BLOCK_N=blocks.block_n, BLOCK_R=row_block(rows),
            BOUND=bound, AGGREGATION=aggregation,
            BLOCK_VOTES=blocks.block_votes, ACCUMULATE=start > 0, UPCAST=upcast,
            PRECISION="ieee" if fp32_dot else "tf32",
            num_warps=num_warps,
        )
        if aggregation == "vote":
            count = count_blocks(n_spans, blocks, rows, votes)
            _count_votes_kernel[(triton.cdiv(rows, count.block_rows), batch * kv_heads)](
                block_scores, block_spans, primary, rows, n_spans, n_blocks * blocks.block_votes,
                min(votes, n_spans * blocks.candidates),
                VOTES=count.votes, VOTES_PAD=triton.next_power_of_2(count.votes), BLOCK_ROWS=count.block_rows,
                CHUNK=count.chunk_entries, num_warps=8,
            )
    return primary, best


class ScoreBlocks(NamedTuple):
    """The tile sizes of score_spans for one span bucket."""

    c_pad: int  # candidates per span, padded (1 for a bound)
    d_pad: int  # head_dim, padded
    block_n: int  # spans per program
    block_votes: int  # picks each (head, query) row keeps per block of spans ("vote")
    candidates: int  # candidates per span: c, or 1 for a bound


class CountBlocks(NamedTuple):
    """The tile sizes of one _count_votes_kernel launch."""

    votes: int  # VOTES: picks kept per row, >= the votes actually cast (n_spans may hold fewer candidates)
    chunk_entries: int  # picks of a row loaded per step
    block_rows: int  # rows per program


def span_bucket(n_spans: int) -> int:
    """The power of two at or above n_spans (>= 1). The selection launchers (here and kernels/topk.py) derive every
    block size from it, never from n_spans itself, so all n_spans of one bucket share one compiled variant."""
    return triton.next_power_of_2(n_spans)


def score_blocks(n_spans: int, c: int, dim: int, element_size: int, bound: bool, votes: int,
                 block_vectors: int | None = None) -> ScoreBlocks:
    """Tile sizes of a score_spans call over n_spans spans of c summary vectors of dim elements each; block_vectors:
    summary vectors per program (default: TILE_BYTES of them)."""
    c_pad = 1 if bound else triton.next_power_of_2(c)
    d_pad = max(16, triton.next_power_of_2(dim))
    vectors = block_vectors or TILE_BYTES // (d_pad * element_size)
    loaded_per_span = 2 if bound else c_pad
    block_n = min(span_bucket(n_spans), triton.next_power_of_2(max(1, vectors // loaded_per_span)))
    block_n = max(block_n, max(1, 16 // c_pad))  # tl.dot needs >= 16 candidates
    return ScoreBlocks(c_pad, d_pad, block_n, min(votes, block_n * c_pad), 1 if bound else c)


def launch_queries(batch: int, q_heads: int, n_queries: int, n_spans: int, blocks: ScoreBlocks,
                   aggregation: str) -> int:
    """Queries scored per launch: all of them, except that "vote" keeps its per-block picks of a launch's queries
    within VOTE_SCRATCH_BYTES (sized for the bucket's blocks, so the split is the same across the bucket)."""
    if aggregation != "vote":
        return n_queries
    bucket_blocks = triton.cdiv(span_bucket(n_spans), blocks.block_n)
    bytes_per_query = batch * q_heads * bucket_blocks * blocks.block_votes * 8
    return max(1, min(n_queries, VOTE_SCRATCH_BYTES // bytes_per_query))


def row_block(rows: int) -> int:
    """BLOCK_R: (head, query) rows of one tl.dot, for a launch over `rows` rows."""
    return min(ROWS_PER_DOT, max(16, triton.next_power_of_2(rows)))


def count_blocks(n_spans: int, blocks: ScoreBlocks, rows: int, votes: int) -> CountBlocks:
    """Tile sizes of the _count_votes_kernel launch after a score launch over `rows` rows."""
    bucket_entries = triton.cdiv(span_bucket(n_spans), blocks.block_n) * blocks.block_votes
    chunk_entries = min(COUNT_TILE // 2, triton.next_power_of_2(bucket_entries))
    block_rows = min(triton.next_power_of_2(rows), COUNT_TILE // chunk_entries)
    return CountBlocks(min(votes, span_bucket(n_spans) * blocks.candidates), chunk_entries, block_rows)


def score_spans_reference(
    queries: torch.Tensor,
    summaries: torch.Tensor,
    kind: str,
    aggregation: str,
    votes: int = 4,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """score_spans through the policies' own PyTorch code (Policy.aggregate of mean for "dot", quest for "bound")."""
    _validate(queries, summaries, kind, aggregation, votes, out, need_triton_device=False)
    batch, hq, n_queries, dim = queries.shape
    kv_heads = summaries.shape[1]
    policy = (QuestPolicy if kind == "bound" else MeanPolicy)(aggregation=aggregation, votes=votes)
    grouped = queries.float().reshape(batch, kv_heads, hq // kv_heads, n_queries, dim)  # [B, Hkv, g, q, D]
    primary, best = policy.aggregate(grouped, summaries.float())
    if out is None:
        return primary, best
    out[0].copy_(primary)
    out[1].copy_(best)
    return out


def triton_device(tensor: torch.Tensor) -> bool:
    """Whether Triton kernels can take `tensor`: on CUDA, or anywhere under the interpreter."""
    return tensor.is_cuda or _interpreting()


def require_same_device(tensors: dict[str, torch.Tensor], need_triton_device: bool) -> None:
    """ValueError unless the named tensors share one device, and (need_triton_device) one Triton can take."""
    (first, tensor), *others = tensors.items()
    for name, other in others:
        if other.device != tensor.device:
            raise ValueError(f"{first} on {tensor.device} but {name} on {other.device}")
    if need_triton_device and not triton_device(tensor):
        raise ValueError(f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {tensor.device}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _validate(queries, summaries, kind, aggregation, votes, out, need_triton_device=True) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if isinstance(votes, bool) or not isinstance(votes, int) or votes < 1:
        raise ValueError(f"votes must be a positive integer, got {votes!r}")
    if queries.dim() != 4:
        raise ValueError(f"queries must be [B, Hq, q, D], got shape {tuple(queries.shape)}")
    if summaries.dim() != 5:
        raise ValueError(f"summaries must be [B, Hkv, n, c, D], got shape {tuple(summaries.shape)}")
    batch, hq, _, dim = queries.shape
    _, kv_heads, n_spans, c, _ = summaries.shape
    if summaries.shape[0] != batch or summaries.shape[4] != dim:
        raise ValueError(f"summaries {tuple(summaries.shape)} do not match queries {tuple(queries.shape)} "
                         "in batch or head_dim")
    if kv_heads == 0 or hq % kv_heads:
        raise ValueError(f"{hq} query heads cannot be grouped over {kv_heads} KV heads")
    if kind == "bound" and c != 2:
        raise ValueError(f'a "bound" summary is [min, max]: c must be 2, got {c}')
    if queries.dtype not in DTYPES or summaries.dtype != queries.dtype:
        raise ValueError(f"queries and summaries must share one dtype of {DTYPES}, "
                         f"got {queries.dtype} and {summaries.dtype}")
    require_same_device({"queries": queries, "summaries": summaries}, need_triton_device)
    if queries.stride(3) != 1:
        raise ValueError(f"queries need unit stride along head_dim, got strides {queries.stride()}")
    if summaries.stride(4) != 1 or (c > 1 and summaries.stride(3) != dim):
        raise ValueError(f"each span's summary [c, D] must be contiguous, got strides {summaries.stride()}")
    if out is not None:
        for tensor in out:
            shape_ok = tensor.shape == (batch, kv_heads, n_spans) and tensor.is_contiguous()
            if not shape_ok or tensor.dtype != torch.float32:
                raise ValueError(f"out must be two contiguous float32 [{batch}, {kv_heads}, {n_spans}] tensors, got "
                                 f"{tuple(tensor.shape)} {tensor.dtype}")
            if tensor.device != queries.device:
                raise ValueError(f"out must be on {queries.device}, got {tensor.device}")
        if out[0].data_ptr() == out[1].data_ptr():
            raise ValueError("out's primary and secondary must be distinct tensors")
