"""kvtier.kernels.warmup: one selection call per (span bucket, query count), refused arguments, and the property it
rests on: the launchers' block sizes depend on the span count only through its bucket."""
from __future__ import annotations

import pytest
import torch

from kvtier.kernels import warmup
from kvtier.kernels.scoring import count_blocks, launch_queries, row_block, score_blocks, span_bucket
from kvtier.kernels.topk import top_k_blocks
from kvtier.kernels.warmup import precompile, query_counts, span_buckets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU through Triton's interpreter (tests/conftest.py)
TINY = dict(batch=1, q_heads=2, kv_heads=1, head_dim=16, summary_size=2, kind="bound", aggregation="vote", votes=4,
            top_k=2, per_kv_head=False, chunk_size=4, max_spans=5, dtype=torch.float32, device=DEVICE)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("max_spans", [1, 2, 3, 5, 16, 17, 1000, (1 << 20) + 1])
def test_span_buckets_are_sorted_powers_of_two_covering_the_max(max_spans):
    buckets = span_buckets(max_spans)
    assert buckets[0] == 1 and buckets == sorted(set(buckets))
    assert all(b & (b - 1) == 0 for b in buckets)  # powers of two
    assert buckets[-1] >= max_spans > buckets[-1] // 2  # covers the max, and no bucket beyond it
    assert {span_bucket(n) for n in range(1, min(max_spans, 5000) + 1)} <= set(buckets)


def test_query_counts_are_a_decode_step_and_a_prefill_chunk():
    assert query_counts(512) == [1, 512] and query_counts(1) == [1]


@pytest.mark.parametrize("aggregation, kind, c, chunk_size, expected", [
    ("vote", "bound", 2, 4, [(n, q) for n in (1, 2, 4, 8) for q in (1, 4)]),
    ("sum", "dot", 3, 1, [(n, 1) for n in (1, 2, 4, 8)]),
])
def test_precompile_selects_once_per_bucket_and_query_count(monkeypatch, aggregation, kind, c, chunk_size, expected):
    seen = []

    def select_spans(queries, summaries, *args, **kwargs):
        seen.append((summaries.shape[2], queries.shape[2]))
        return real_select(queries, summaries, *args, **kwargs)

    real_select = warmup.select_spans
    monkeypatch.setattr(warmup, "select_spans", select_spans)
    shapes = {**TINY, "aggregation": aggregation, "kind": kind, "summary_size": c, "chunk_size": chunk_size}
    assert precompile(**shapes) == len(expected)
    assert seen == expected  # max_spans 5: buckets 1, 2, 4, 8


def test_precompile_span_scores_scores_once_per_bucket(monkeypatch):
    seen = []

    def span_best_scores(queries, keys):
        seen.append((keys.shape[2], queries.shape[3]))
        return real(queries, keys)

    real = warmup.span_best_scores
    monkeypatch.setattr(warmup, "span_best_scores", span_best_scores)
    shapes = dict(batch=1, q_heads=4, kv_heads=2, head_dim=16, span_size=4, window=3, max_spans=5,
                  dtype=torch.float32, device=DEVICE)
    assert warmup.precompile_span_scores(**shapes) == 4
    assert seen == [(1, 3), (2, 3), (4, 3), (8, 3)]  # each bucket once, with the policy's window of queries
    with pytest.raises(ValueError, match="cannot be grouped"):
        warmup.precompile_span_scores(**{**shapes, "q_heads": 3})


@pytest.mark.parametrize("change, message", [
    (dict(max_spans=0), "max_spans must be a positive integer"),
    (dict(chunk_size=0), "chunk_size must be a positive integer"),
    (dict(head_dim=-1), "head_dim must be a positive integer"),
    (dict(top_k=-1), "top_k must be a non-negative integer"),
    (dict(q_heads=3, kv_heads=2), "cannot be grouped"),
    (dict(kind="cosine"), "kind must be one of"),
    (dict(summary_size=3), "summary_size must be 2"),
    (dict(aggregation="mean"), "aggregation must be one of"),
    (dict(dtype=torch.int8), "dtype must be one of"),
])
def test_precompile_refuses_bad_arguments_naming_the_problem(monkeypatch, change, message):
    monkeypatch.setattr(warmup, "select_spans", lambda *args, **kwargs: pytest.fail("ran despite bad arguments"))
    with pytest.raises(ValueError, match=message):
        precompile(**{**TINY, **change})


def _launch_sizes(n_spans: int, kind: str, c: int, aggregation: str, top_k: int) -> list:
    """Every block size (the kernels' constexprs) the score_spans and top_k_spans launchers pick for n_spans, for a
    decode step and a prefill chunk of a Llama-8B-shaped layer (32 query heads over 8 KV heads, head_dim 128)."""
    blocks = score_blocks(n_spans, c, 128, 2, kind == "bound", 4)
    sizes = [blocks, top_k_blocks(n_spans, min(top_k, n_spans))]
    for n_queries in (1, 512):
        per_launch = launch_queries(1, 32, n_queries, n_spans, blocks, aggregation)
        for start in range(0, n_queries, per_launch):
            rows = 4 * min(per_launch, n_queries - start)
            sizes += [start > 0, row_block(rows), count_blocks(n_spans, blocks, rows, 4)]
    return sizes


@pytest.mark.parametrize("kind, c, aggregation, top_k", [
    ("bound", 2, "vote", 127), ("dot", 1, "max", 63), ("dot", 3, "vote", 5), ("dot", 32, "vote", 127),
])
def test_block_sizes_depend_on_the_span_count_only_through_its_bucket(kind, c, aggregation, top_k):
    """What makes one call per bucket compile every variant a growing context reaches."""
    spans = list(range(1, 300)) + [n for j in range(9, 21) for n in ((1 << j) + 1, 3 << (j - 1), 1 << (j + 1))]
    for n_spans in spans:
        bucket = span_bucket(n_spans)
        assert _launch_sizes(n_spans, kind, c, aggregation, top_k) == \
            _launch_sizes(bucket, kind, c, aggregation, top_k), n_spans
