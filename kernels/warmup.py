"""Compile the span-selection kernels (and consensus' span-score kernel) before a run: Triton compiles a kernel variant on its first launch (1-2 s
each on a GPU), which would otherwise land inside whatever is being timed when a growing context first reaches it.

The launchers (kernels/scoring.py, kernels/topk.py) derive every block size from the span count's bucket
(`span_bucket`) and from the query count, and take the other sizes as runtime integers. So the variants a layer needs
while selecting among up to max_spans spans, in decode steps (1 query) and prefill chunks (chunk_size queries), are
those of one select_spans call per (bucket, query count), plus one rotation of the queries (kernels/rotary.py) per
query count.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .scoring import AGGREGATIONS, DTYPES, KINDS, span_bucket, triton_device
from .rotary import rotate
from .select import select_spans
from .window_mass import span_best_scores


def span_buckets(max_spans: int) -> list[int]:
    """The buckets of 1..max_spans spans, ascending: powers of two, the last one >= max_spans."""
    _require_positive(max_spans=max_spans)
    buckets = [span_bucket(1)]
    while buckets[-1] < max_spans:
        buckets.append(span_bucket(buckets[-1] + 1))
    return buckets


def query_counts(chunk_size: int) -> list[int]:
    """Queries per selection call: 1 in a decode step, chunk_size in a prefill chunk."""
    _require_positive(chunk_size=chunk_size)
    return sorted({1, chunk_size})


def precompile(
    *,
    batch: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    summary_size: int,
    kind: str,
    aggregation: str,
    votes: int,
    top_k: int,
    per_kv_head: bool,
    chunk_size: int,
    max_spans: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> int:
    """Compile every variant of the selection kernels that a layer of these shapes reaches with up to max_spans
    sealed spans: one select_spans call (use_triton=True) per (span bucket, query count) on random inputs -> the
    number of calls. summary_size: c, the policy's summary_size(span_size); kind / aggregation / votes: the policy's
    kernel_scoring / aggregation / votes; top_k, per_kv_head, chunk_size: the config's. Raises ValueError on bad
    arguments before running anything."""
    _validate(batch, q_heads, kv_heads, head_dim, summary_size, kind, aggregation, votes, top_k, per_kv_head, dtype,
              device)
    device = torch.device(device)
    buckets, counts = span_buckets(max_spans), query_counts(chunk_size)
    # the span table as a layer holds it, a narrowed buffer: [B, Hkv, n, c, D] views of [B, Hkv, n_max, c, D]
    table = torch.randn(batch, kv_heads, buckets[-1], summary_size, head_dim, dtype=dtype, device=device)
    queries = {  # [B, Hq, q, D] laid out as attention hands them over: view(B, q, Hq, D).transpose(1, 2)
        count: torch.randn(batch, count, q_heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
        for count in counts
    }
    calls = [(n_spans, count) for n_spans in buckets for count in counts]
    for n_spans, count in tqdm(calls, desc="compiling Triton kernels", unit="call", leave=False):
        select_spans(queries[count], table.narrow(2, 0, n_spans), kind, aggregation, votes, top_k, per_kv_head,
                     use_triton=True)
    trig = torch.zeros(chunk_size, head_dim, dtype=torch.float32, device=device)  # [positions, D] cos / sin
    for count in counts:  # the queries' rotation: one variant per tile height
        rotate(queries[count], trig, trig, 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(calls)


def precompile_span_scores(*, batch: int, q_heads: int, kv_heads: int, head_dim: int, span_size: int, window: int,
                           max_spans: int, dtype: torch.dtype, device: torch.device | str) -> int:
    """Compile every variant of consensus' span-score kernel (kvtier.kernels.window_mass) that a layer reaches with up
    to max_spans sealed spans: one call per span bucket, on random inputs shaped as the policy calls it (its `window`
    queries per head, the span table's keys as a narrowed buffer) -> the number of calls."""
    _require_positive(batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, span_size=span_size,
                      window=window)
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads cannot be grouped over {kv_heads} KV heads")
    device = torch.device(device)
    buckets = span_buckets(max_spans)
    keys = torch.randn(batch, kv_heads, buckets[-1], span_size, head_dim, dtype=dtype, device=device)  # [B, Hkv, n, S, D]
    queries = torch.randn(batch, kv_heads, q_heads // kv_heads, window, head_dim, dtype=dtype, device=device)
    for n_spans in tqdm(buckets, desc="compiling Triton kernels", unit="call", leave=False):
        span_best_scores(queries, keys.narrow(2, 0, n_spans))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(buckets)


def _validate(batch, q_heads, kv_heads, head_dim, summary_size, kind, aggregation, votes, top_k, per_kv_head, dtype,
              device) -> None:
    _require_positive(batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, summary_size=summary_size,
                      votes=votes)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads cannot be grouped over {kv_heads} KV heads")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "bound" and summary_size != 2:
        raise ValueError(f'a "bound" summary is [min, max]: summary_size must be 2, got {summary_size}')
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not isinstance(per_kv_head, bool):
        raise ValueError(f"per_kv_head must be true or false, got {per_kv_head!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")
    if not triton_device(torch.empty(0, device=device)):
        raise ValueError(f"the Triton kernels need a CUDA device (or TRITON_INTERPRET=1), got {device}")


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
