"""Invariants 2, 4 and 6 and the cache-level selection rules: bounded positions, streaming, batches, selection."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvtier import ReAttentionCache
from tests.conftest import greedy, random_ids, tiny_model

TINY = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)


def test_positions_stay_below_the_bound_over_a_long_generation():
    model = tiny_model("llama")
    cache = ReAttentionCache(model, **TINY)
    bound = 4 + 3 * 4 + 24 + (cache.config.seal_group - 1) * 4  # the local window grows until a group is sealed
    assert cache.config.seal_group > 1
    scopes = []
    original = cache.layers[0].gather_scope

    def recording(ids, rotary, local=None):
        keys, values = original(ids, rotary, local)
        scopes.append(keys.shape[2])
        return keys, values

    cache.layers[0].gather_scope = recording
    greedy(model, random_ids(100), cache, new_tokens=220)
    stats = cache.stats()
    assert stats["tokens"] == 100 + 220 - 1  # the last generated token is never fed back
    assert max(scopes) <= bound and stats["scope_tokens"] <= bound
    assert stats["max_position"] < bound
    assert stats["max_position"] == stats["scope_tokens"] - 1
    assert min(scopes[len(scopes) // 2 :]) >= 4 + 3 * 4 + 24 - 4 + 1  # the scope really is full, not empty


def test_rotary_refuses_positions_beyond_the_bound():
    model = tiny_model("llama")
    cache = ReAttentionCache(model, **TINY)
    rotary = cache._rotary_on(torch.device("cpu"))
    with pytest.raises(AssertionError, match="scope bound"):
        rotary.rotate(torch.randn(1, 2, 2, 16), cache.config.scope_bound - 1)


def _record_selections(cache):
    """Collect every (layer, selected ids) the cache's layers return."""
    seen = []
    for index, layer in enumerate(cache.layers):
        layer.batches_forwards = False  # each chunk's selection through `select`
        original = layer.select

        def recording(queries, original=original, index=index, layer=layer):
            ids = original(queries)
            seen.append((index, ids.clone(), len(layer.table)))
            return ids

        layer.select = recording
    return seen


@pytest.mark.parametrize("policy", ["reattention", "mean", "quest", "infllm"])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_selection_is_sorted_unique_bounded_and_only_middle_spans(policy, per_kv_head):
    model = tiny_model("qwen2")
    cache = ReAttentionCache(model, policy=policy, per_kv_head=per_kv_head, **TINY)
    seen = _record_selections(cache)
    greedy(model, random_ids(90), cache, new_tokens=30)
    assert any(ids.shape[-1] == 3 for _, ids, _ in seen)
    for _, ids, n_spans in seen:
        assert ids.shape[:2] == (1, 2) and ids.shape[-1] == min(3, n_spans)
        if ids.shape[-1]:
            assert (ids[..., 1:] > ids[..., :-1]).all()  # sorted and unique
            assert ids.min() >= 0 and ids.max() < n_spans  # spans are sealed middle tokens only
        if not per_kv_head:
            assert (ids == ids[:, :1]).all()  # one selection shared by every head
    # sealed spans hold exactly the tokens that are neither global nor local: nothing is selectable twice
    layer = cache.layers[0]
    assert layer.global_region.length + len(layer.table) * 4 + layer.local.length == layer.seen


def test_streaming_equals_attention_over_global_and_last_local_tokens():
    """The streaming policy must equal plain attention over [first G | last W] with contiguous positions. One layer,
    so that the keys are functions of the tokens alone (deeper, they also depend on each token's own past scope)."""
    model = tiny_model("llama", num_hidden_layers=1)
    g, w = 4, 24
    cache = ReAttentionCache(model, policy="streaming", global_size=g, local_size=w, span_size=4, top_k=3, chunk_size=1)
    ids = random_ids(60)
    with torch.inference_mode():
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
        ours = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1]
        local = cache.layers[0].local.length  # between w - span + 1 and w tokens, ending with the query
        kept = torch.cat([ids[:, :g], ids[:, -local:]], dim=1)
        reference = model(kept).logits[0, -1]  # stock model on the scope's tokens, positions 0..L-1
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert w - 4 < local <= w


def test_batch_of_equal_rows_equals_rows_one_at_a_time():
    model = tiny_model("llama")
    ids = random_ids(120, batch=3)
    together = greedy(model, ids, ReAttentionCache(model, policy="quest", per_kv_head=True, **TINY))
    for row in range(3):
        alone = greedy(model, ids[row : row + 1], ReAttentionCache(model, policy="quest", per_kv_head=True, **TINY))
        assert torch.equal(together[row : row + 1], alone)


def test_chunked_prefill_through_generate_matches_one_piece():
    """Pieces of a multiple of chunk_size give the one-piece prefill's query chunks, so its tokens; any other piece
    size also cuts a chunk where a piece ends (the chunk's queries select alone: the result may differ there)."""
    model = tiny_model("mistral")
    ids = random_ids(150)
    whole = greedy(model, ids, ReAttentionCache(model, **TINY), new_tokens=20)
    for piece in (36, 24):
        chunked = greedy(model, ids, ReAttentionCache(model, **TINY), new_tokens=20, prefill_chunk_size=piece)
        assert torch.equal(whole, chunked)
    cache = ReAttentionCache(model, **TINY)
    held = []
    layer = cache.layers[0]
    layer.batches_forwards = False  # each chunk's selection through `select`, as the layer stands at that chunk
    original = layer.select
    layer.select = lambda queries: held.append(layer.tokens_held()) or original(queries)
    greedy(model, ids, cache, new_tokens=1, prefill_chunk_size=25)
    assert held == sorted({*range(12, 150, 12), *range(25, 151, 25)})  # multiples of 12, and where pieces end


def test_queries_are_processed_in_chunks_of_chunk_size():
    model = tiny_model("llama")
    cache = ReAttentionCache(model, **TINY)
    seen = _record_selections(cache)
    with torch.inference_mode():
        model(random_ids(100), past_key_values=cache, use_cache=True)
    assert len([1 for layer, _, _ in seen if layer == 0]) == -(-100 // 12)


def test_sdpa_mask_is_bottom_right_causal_and_query_heads_share_their_kv_head():
    from kvtier.attention import _attend

    q, k, v = torch.randn(1, 6, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)  # 3 query heads per KV head
    out = _attend(q, k, v, None)  # [B, c, Hq, D]
    assert out.shape == (1, 3, 6, 8)
    for i in range(3):
        visible = 7 - 3 + i + 1
        expected = F.scaled_dot_product_attention(
            q[:, :, i : i + 1], k[:, :, :visible], v[:, :, :visible], enable_gqa=True
        )  # [B, Hq, 1, D]
        torch.testing.assert_close(out[:, i : i + 1], expected.transpose(1, 2))


def test_attention_takes_sdpa_outputs_of_any_layout(monkeypatch):
    """Flash attention on CUDA returns [B, H, q, D] laid out as [B, q, H, D]; the result must not depend on it."""
    from kvtier import attention

    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    expected, expected_step = attention._attend(q, k, v, 0.5), attention._attend(q[:, :, :1], k, v, 0.5)
    real = F.scaled_dot_product_attention

    def flash_layout(*args, **kwargs):
        return real(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", flash_layout)
    assert torch.equal(attention._attend(q, k, v, 0.5), expected)
    assert torch.equal(attention._attend(q[:, :, :1], k, v, 0.5), expected_step)


def test_bottom_right_mask_follows_the_rule_and_is_built_once_per_shape():
    from kvtier.attention import _bottom_right_mask

    cpu = torch.device("cpu")
    mask = _bottom_right_mask(10, 3, 2, cpu, False)  # [g*c, L]: row h*c + t sees keys 0..L-c+t
    expected = torch.tensor([[key <= 10 - 3 + t for key in range(10)] for _ in range(2) for t in range(3)])
    assert torch.equal(mask, expected)
    assert _bottom_right_mask(10, 3, 2, cpu, False) is mask  # the next layer of the same forward reuses it
    assert _bottom_right_mask(11, 3, 2, cpu, False) is not mask
    with torch.inference_mode():
        assert _bottom_right_mask(11, 3, 2, cpu, True).is_inference()
    assert not _bottom_right_mask(11, 3, 2, cpu, False).is_inference()  # usable where autograd is on
