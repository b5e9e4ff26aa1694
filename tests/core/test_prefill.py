"""A forward of several query chunks taken in at once (kvtier.prefill): each chunk sees exactly the scope it sees when
the chunks go one by one, for every policy."""
from __future__ import annotations

import pytest
import torch

from kvtier import ReAttentionCache
from kvtier.prefill import chunk_bounds, plan_chunks
from tests.conftest import random_ids, tiny_model

TINY = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)  # scope bound 4 + 3*4 + 24 = 40


def _forwards(model, cache, ids: torch.Tensor, pieces: list[int]) -> list[torch.Tensor]:
    """Feed ids [1, T] in forwards of `pieces` tokens -> each forward's logits [1, piece, V]."""
    logits, start = [], 0
    with torch.inference_mode():
        for piece in pieces:
            logits.append(model(ids[:, start : start + piece], past_key_values=cache, use_cache=True).logits)
            start += piece
    return logits


def _one_by_one(cache: ReAttentionCache) -> ReAttentionCache:
    for layer in cache.layers:
        layer.batches_forwards = False
    return cache


@pytest.mark.parametrize("policy", ["consensus", "quest", "reattention", "mean", "infllm", "streaming"])
def test_a_forward_taken_at_once_gives_the_logits_and_cache_of_chunk_by_chunk(policy):
    model = tiny_model("llama")
    ids = random_ids(290, seed=3)
    pieces = [50, 97, 130, 1, 1, 11]  # the first fills the global region; later ones start mid-chunk
    at_once = ReAttentionCache(model, **TINY, policy=policy)
    by_chunk = _one_by_one(ReAttentionCache(model, **TINY, policy=policy))
    batched = []
    selects = at_once.layers[0].policy.select_chunks
    at_once.layers[0].policy.select_chunks = lambda *args, **kwargs: batched.append(selects(*args, **kwargs)) or \
        batched[-1]
    for got, want in zip(_forwards(model, at_once, ids, pieces), _forwards(model, by_chunk, ids, pieces)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for layer, reference in zip(at_once.layers, by_chunk.layers):
        assert (layer.seen, layer.local.length, len(layer.table)) == (reference.seen, reference.local.length,
                                                                       len(reference.table))
        assert torch.equal(layer.local.view()[0], reference.local.view()[0])
        assert torch.equal(layer.table.summaries.view(), reference.table.summaries.view())
    assert at_once.stats()["scope_tokens"] == by_chunk.stats()["scope_tokens"]
    assert len(batched) == 2 * 3  # two layers, the three forwards of several chunks after the global region filled
    if policy == "consensus":  # selected in one pass once its window was full (the last two), else chunk by chunk
        assert [chosen is not None for chosen in batched] == [False, False, True, True, True, True]


def test_consensus_selects_every_chunk_as_one_by_one_per_kv_head_too():
    model = tiny_model("llama")
    ids = random_ids(260, seed=5)
    config = dict(TINY, policy="consensus", per_kv_head=True, policy_options={"window": 16})
    chosen = {}
    for name, cache in (("at once", ReAttentionCache(model, **config)),
                        ("by chunk", _one_by_one(ReAttentionCache(model, **config)))):
        _forwards(model, cache, ids, [61, 199])  # the second forward's first chunk: 11 queries, fewer than the window
        state = cache.layers[1].policy._layers[1]
        chosen[name] = (state.selected.clone(), state.spans, state.filled, state.next, state.ring.clone())
    assert chosen["at once"][0].equal(chosen["by chunk"][0])
    assert chosen["at once"][1:4] == chosen["by chunk"][1:4]
    assert torch.equal(chosen["at once"][4], chosen["by chunk"][4])  # the same ring, slot for slot


def test_the_plan_matches_the_layer_ingesting_chunk_by_chunk():
    model = tiny_model("llama")
    cache = _one_by_one(ReAttentionCache(model, **TINY))
    _forwards(model, cache, random_ids(70), [70])
    layer = cache.layers[0]
    seen = []
    original = layer.select
    layer.select = lambda queries: seen.append((len(layer.table), layer.local.length, layer.tokens_held())) or \
        original(queries)
    before = (layer.local.length, len(layer.table), layer.global_region.length)
    _forwards(model, cache, random_ids(61, seed=2), [61])
    bounds = chunk_bounds(layer.seen, 61, TINY["chunk_size"])
    chunks, sealed = plan_chunks(bounds, *before, TINY["local_size"], TINY["span_size"])
    assert [(start, end) for start, end in bounds] == [(0, 2), (2, 14), (14, 26), (26, 38), (38, 50), (50, 61)]
    assert [(chunk.spans, chunk.local.stop - chunk.local.start, chunk.tokens) for chunk in chunks] == seen
    assert sealed == (len(layer.table) - before[1]) * TINY["span_size"]


def test_a_tight_gpu_budget_takes_a_forward_at_once_in_groups_of_one_chunks_spans():
    model = tiny_model("llama")
    ids = random_ids(300, seed=4)
    span_bytes = 2 * 2 * TINY["span_size"] * 16 * 4  # K and V, 2 KV heads, head_dim 16, fp32
    config = dict(TINY, gpu_budget=12 * span_bytes)  # 12 spans: fewer than the forward of 250 seals
    at_once = ReAttentionCache(model, **config)
    by_chunk = _one_by_one(ReAttentionCache(model, **config))
    for got, want in zip(_forwards(model, at_once, ids, [50, 250]), _forwards(model, by_chunk, ids, [50, 250])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert at_once.stats()["tiers"]["gpu"]["evictions"] > 0  # spans went down to the host as the forward sealed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernel path)")
@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["consensus", "quest"])
def test_on_the_kernel_path_a_forward_at_once_gives_chunk_by_chunks_logits(policy):
    model = tiny_model("llama").cuda()
    ids = random_ids(700, seed=6).cuda()
    pieces = [100, 600]
    at_once = ReAttentionCache(model, **TINY, policy=policy)
    by_chunk = _one_by_one(ReAttentionCache(model, **TINY, policy=policy))
    for got, want in zip(_forwards(model, at_once, ids, pieces), _forwards(model, by_chunk, ids, pieces)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert at_once.layers[0].use_kernels
