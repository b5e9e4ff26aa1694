"""Invariant 1: when the scope covers everything, kvtier generates exactly what the stock model and cache do."""
from __future__ import annotations

import pytest
import torch

from kvtier import ReAttentionCache
from tests.conftest import greedy, random_ids, tiny_model


def test_context_within_global_plus_local_matches_stock(family):
    model = tiny_model(family)
    ids = random_ids(200)
    stock = greedy(model, ids, new_tokens=40)
    cache = ReAttentionCache(model, global_size=8, local_size=256, span_size=8, top_k=4, chunk_size=48)
    assert torch.equal(greedy(model, ids, cache, new_tokens=40), stock)
    assert cache.stats()["spans"]["gpu"] == 0  # nothing left the local window: the claim is about the full scope


def test_top_k_covering_every_span_matches_stock(family):
    model = tiny_model(family)
    ids = random_ids(300)
    stock = greedy(model, ids, new_tokens=40)
    cache = ReAttentionCache(model, global_size=8, local_size=64, span_size=8, top_k=64, chunk_size=24)
    assert torch.equal(greedy(model, ids, cache, new_tokens=40), stock)
    assert cache.stats()["spans"]["gpu"] > 0  # the middle really went through sealing, selection and gather


def test_logits_match_stock_within_float32_tolerance(family):
    model = tiny_model(family)
    ids = random_ids(160)
    with torch.inference_mode():
        stock = model(ids).logits
        cache = ReAttentionCache(model, global_size=4, local_size=40, span_size=4, top_k=64, chunk_size=16)
        ours = model(ids, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


def test_bound_model_still_behaves_as_stock_with_other_caches(family):
    model = tiny_model(family)
    ids = random_ids(120)
    before = greedy(model, ids)
    ReAttentionCache(model, global_size=4, local_size=32, span_size=4, top_k=2, chunk_size=16)
    assert model.config._attn_implementation == "reattention"
    assert torch.equal(greedy(model, ids), before)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids, use_cache=False).logits, model(ids, use_cache=True).logits)


def test_binding_twice_is_idempotent():
    model = tiny_model("llama")
    ids = random_ids(150)
    first = greedy(model, ids, ReAttentionCache(model, global_size=4, local_size=32, span_size=4, top_k=3, chunk_size=16))
    second = greedy(model, ids, ReAttentionCache(model, global_size=4, local_size=32, span_size=4, top_k=3, chunk_size=16))
    assert torch.equal(first, second)
    assert len(model.get_decoder()._forward_pre_hooks) == 1


def test_the_cache_keyword_of_newer_transformers_works_too():
    import inspect

    model = tiny_model("llama")
    if "cache" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers release predates the `cache=` keyword (added in 5.24)")
    ids = random_ids(100)
    sizes = dict(global_size=4, local_size=32, span_size=4, top_k=3, chunk_size=8)
    with torch.inference_mode():
        by_new_name = model.generate(
            ids, cache=ReAttentionCache(model, **sizes), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )
    assert torch.equal(by_new_name[:, 100:], greedy(model, ids, ReAttentionCache(model, **sizes), new_tokens=12))
