"""A forward of several query chunks taken in at once (kvtier.prefill): each chunk sees exactly the scope it sees when
the chunks go one by one, for every policy."""
from __future__ import annotations

import pytest
import torch

from kvtier import ReAttentionCache, attention
from kvtier.prefill import chunk_bounds, padded_index, plan_chunks, unpadded_positions
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
        # a later layer's keys follow the attention of the ones before: equal to rounding (padded rows, one SDPA)
        torch.testing.assert_close(layer.local.view()[0], reference.local.view()[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.table.summaries.view(), reference.table.summaries.view(), rtol=1e-5,
                                   atol=1e-5)
    assert at_once.stats()["scope_tokens"] == by_chunk.stats()["scope_tokens"]
    assert all(layer.gathers_chunks_at_once() for layer in at_once.layers)  # every chunk in one gather and SDPA
    # two layers x four forwards of several chunks (the first from its second chunk on: its first filled the global
    # region): select_chunks is asked for the chunks from each one still to select on, until it takes them
    taken = [len(chosen) for chosen in batched if chosen is not None]
    if policy == "consensus":  # in one pass from the chunk where its window is full and top_k spans are sealed on
        assert taken == [7, 7, 12, 12, 2, 2]  # the second forward's first 2 of 9 chunks one by one
    else:
        assert taken == [] and len(batched) == 2 * (4 + 9 + 12 + 2)


@pytest.mark.parametrize("layout", ["text", "best_last"])
def test_a_prompt_in_one_forward_selects_and_attends_at_once_after_its_first_chunks(layout):
    model = tiny_model("llama")
    ids = random_ids(300, seed=8)
    config = dict(TINY, policy="consensus", policy_options={"window": 8, "layout": layout})
    at_once, by_chunk = ReAttentionCache(model, **config), _one_by_one(ReAttentionCache(model, **config))
    groups = []
    same_counts = attention._same_span_counts
    attention._same_span_counts = lambda chosen: groups.append(same_counts(chosen)) or groups[-1]
    try:
        got, want = _forwards(model, at_once, ids, [300])[0], _forwards(model, by_chunk, ids, [300])[0]
    finally:
        attention._same_span_counts = same_counts
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # per layer, after the chunk that filled the global region: two chunks with fewer than top_k spans to choose from
    # (as many in each), then every chunk with top_k spans, in one group
    assert [[(g.start, g.stop) for g in layer] for layer in groups] == [[(0, 2), (2, 24)]] * 2


def test_same_span_counts_groups_consecutive_chunks_with_as_many_spans():
    chosen = [torch.zeros(1, 2, k, dtype=torch.long) for k in (0, 1, 1, 3, 3, 3, 1)]
    assert attention._same_span_counts(chosen) == [slice(0, 1), slice(1, 3), slice(3, 6), slice(6, 7)]


@pytest.mark.parametrize("per_kv_head, options", [(True, {"vote": "mass"}), (False, {"vote": "rank"}),
                                                  (True, {"vote": "rank"}), (False, {"vote": "log"}),
                                                  (True, {"vote_layers": 1}), (False, {"vote_layers": None})])
def test_consensus_selects_every_chunk_as_one_by_one_with_each_vote_option(per_kv_head, options):
    model = tiny_model("llama")
    ids = random_ids(260, seed=5)
    config = dict(TINY, policy="consensus", per_kv_head=per_kv_head, policy_options={"window": 16, **options})
    chosen = {}
    for name, cache in (("at once", ReAttentionCache(model, **config)),
                        ("by chunk", _one_by_one(ReAttentionCache(model, **config)))):
        _forwards(model, cache, ids, [61, 199])  # the second forward's first chunk: 11 queries, fewer than the window
        state = cache.layers[1].policy._layers[1]
        chosen[name] = (state.selected.clone(), state.spans, state.filled, state.next, state.ring.clone())
    assert chosen["at once"][0].equal(chosen["by chunk"][0])
    assert chosen["at once"][1:4] == chosen["by chunk"][1:4]
    assert torch.equal(chosen["at once"][4], chosen["by chunk"][4])  # the same ring, slot for slot


def test_spans_laid_out_best_last_give_the_same_logits_at_once_as_chunk_by_chunk():
    model = tiny_model("llama")
    ids = random_ids(290, seed=6)
    config = dict(TINY, policy="consensus", policy_options={"layout": "best_last", "window": 8, "neighbours": False})
    at_once, by_chunk = ReAttentionCache(model, **config), _one_by_one(ReAttentionCache(model, **config))
    pieces = [50, 240]
    for got, want in zip(_forwards(model, at_once, ids, pieces), _forwards(model, by_chunk, ids, pieces)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    text = ReAttentionCache(model, **dict(config, policy_options={"window": 8, "neighbours": False, "layout": "text"}))
    logits = _forwards(model, text, ids, pieces)[-1]
    assert not torch.allclose(logits, _forwards(model, ReAttentionCache(model, **config), ids, pieces)[-1])


@pytest.mark.parametrize("seal_group", [1, 3])
def test_the_plan_matches_the_layer_ingesting_chunk_by_chunk(seal_group):
    model = tiny_model("llama")
    cache = _one_by_one(ReAttentionCache(model, **TINY, seal_group=seal_group))
    _forwards(model, cache, random_ids(70), [70])
    layer = cache.layers[0]
    seen = []
    original = layer.select
    layer.select = lambda queries: seen.append((len(layer.table), layer.local.length, layer.tokens_held())) or \
        original(queries)
    before = (layer.local.length, len(layer.table), layer.global_region.length)
    _forwards(model, cache, random_ids(61, seed=2), [61])
    bounds = chunk_bounds(layer.seen, 61, TINY["chunk_size"])
    chunks, sealed = plan_chunks(bounds, *before, TINY["local_size"], TINY["span_size"], seal_group)
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


def test_through_the_triton_kernels_a_forward_at_once_gives_chunk_by_chunks_logits():
    """The kernel path (the scope gather of every chunk at once, the span scores of every window) under Triton's
    interpreter on the CPU."""
    model = tiny_model("llama")
    ids = random_ids(160, seed=7)
    config = dict(TINY, kernels="triton", policy_options={"window": 8})
    at_once = ReAttentionCache(model, **config)
    by_chunk = _one_by_one(ReAttentionCache(model, **config))
    for got, want in zip(_forwards(model, at_once, ids, [60, 100]), _forwards(model, by_chunk, ids, [60, 100])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert at_once.layers[0].use_kernels and at_once.layers[0].gathers_chunks_at_once()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: the Triton kernels on the device (the test above runs them interpreted)")
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


def test_padded_rows_index_and_unpad():
    cpu = torch.device("cpu")
    assert padded_index(((3, 5), (5, 8)), 3, cpu).tolist() == [3, 4, 4, 5, 6, 7]  # a short row repeats its last
    assert unpadded_positions((2, 3), 3, cpu).tolist() == [0, 1, 3, 4, 5]


@pytest.mark.parametrize("policy", ["consensus", "quest"])
def test_a_forward_whose_first_chunks_have_fewer_than_top_k_spans_gives_chunk_by_chunks_logits(policy):
    model = tiny_model("llama")
    ids = random_ids(170, seed=8)
    pieces = [30, 100, 40]  # after 30 tokens no span is sealed: the next forward's first chunks select fewer than 3
    at_once = ReAttentionCache(model, **TINY, policy=policy)
    by_chunk = _one_by_one(ReAttentionCache(model, **TINY, policy=policy))
    for got, want in zip(_forwards(model, at_once, ids, pieces), _forwards(model, by_chunk, ids, pieces)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [2, 3])
def test_a_consensus_stride_scores_every_strideth_chunk_and_the_last_the_rest_reuse_the_one_before(stride):
    model = tiny_model("llama")
    ids = random_ids(300, seed=8)
    chosen = {}
    for name, options in (("every", {"window": 8}), ("stride", {"window": 8, "stride": stride})):
        cache = ReAttentionCache(model, **TINY, policy="consensus", policy_options=options)
        policy, taken = cache.layers[0].policy, []
        selects = policy.select_chunks
        policy.select_chunks = lambda *args, layer, **kwargs: taken.append((layer, selects(*args, layer=layer,
                                                                                           **kwargs))) or taken[-1][1]
        _forwards(model, cache, ids, [100, 200])
        chosen[name] = [result for layer, result in taken if layer == 0 and result is not None]  # layer 0: same queries
    assert [len(results) for results in chosen["stride"]] == [len(results) for results in chosen["every"]] == [6, 17]
    for every, strided in zip(chosen["every"], chosen["stride"]):
        count = len(every)
        scoring = [at for at in range(count) if (at + 1) % stride == 0 or at == count - 1]
        for at in range(scoring[0], count):  # before the first scoring chunk: the selection the forward began with
            source = max(index for index in scoring if index <= at)
            torch.testing.assert_close(strided[at], every[source], rtol=0, atol=0)
        distinct = {tuple(selection.flatten().tolist()) for selection in strided}
        assert len(distinct) <= len(scoring) + 1


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_chunks_sharing_a_selection_read_its_spans_once_with_the_same_logits(kernels):
    if kernels == "triton":
        pytest.importorskip("triton")
    model = tiny_model("llama")
    ids = random_ids(300, seed=8)
    config = dict(TINY, kernels=kernels, policy="consensus", policy_options={"window": 8, "stride": 3})
    shared, copied = ReAttentionCache(model, **config), ReAttentionCache(model, **config)
    policy = copied.layers[0].policy
    selects = policy.select_chunks
    policy.select_chunks = lambda *args, **kwargs: [ids.clone() for ids in (selects(*args, **kwargs) or [])] or None
    gathered = {"shared": [], "copied": []}  # selections whose spans layer 0 gathers, per forward's gather
    for name, cache in (("shared", shared), ("copied", copied)):
        layer = cache.layers[0]
        layer._gather_heads = lambda chosen, *args, gather=layer._gather_heads, seen=gathered[name]: \
            seen.append(len(chosen)) or gather(chosen, *args)
    torch.testing.assert_close(_forwards(model, shared, ids, [100, 200]), _forwards(model, copied, ids, [100, 200]),
                               rtol=0, atol=0)
    assert gathered["copied"] == [2, 6, 17]  # every chunk of the forwards' batched groups
    assert gathered["shared"] == [2, 3, 7]  # the distinct selections: every third chunk, the last, the one held before
