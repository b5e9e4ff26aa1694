"""Span selection, end to end: score the summaries (kernels/scoring.py), then take the top k (kernels/topk.py);
the same ids as kvtier.policies' Policy.select, with the Triton kernels or their PyTorch references."""
from __future__ import annotations

from typing import Callable

import torch

from .scoring import score_spans, score_spans_reference
from .topk import top_k_spans, top_k_spans_reference


def select_spans(
    queries: torch.Tensor,
    summaries: torch.Tensor,
    kind: str,
    aggregation: str,
    votes: int,
    top_k: int,
    per_kv_head: bool,
    use_triton: bool | None = None,
    all_heads: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """queries [B, Hq, q, D] pre-RoPE, summaries [B, Hkv, n, c, D] -> span ids [B, Hsel, k] int64, ascending,
    k = min(top_k, n), Hsel = Hkv when per_kv_head else 1. kind: "dot" or "bound" (see kernels/scoring.py).
    use_triton: the Triton kernels (default: when the queries are on CUDA) or the PyTorch references. all_heads:
    under tensor parallelism, what brings every rank's [B, Hkv, n] scores here before a selection shared by all heads
    (Policy.all_heads)."""
    if use_triton is None:
        use_triton = queries.is_cuda
    score, top = (score_spans, top_k_spans) if use_triton else (score_spans_reference, top_k_spans_reference)
    primary, secondary = score(queries, summaries, kind, aggregation, votes)  # each [B, Hkv, n]
    if per_kv_head:
        return top(primary, secondary, top_k, None)
    if all_heads is not None:
        primary, secondary = all_heads(primary), all_heads(secondary)
    return top(primary, secondary, top_k, "max" if aggregation == "max" else "sum")
