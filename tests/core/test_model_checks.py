"""Models kvtier cannot host, and configurations that do not fit the model, raise errors that name the fix."""
from __future__ import annotations

import pytest
import torch
import transformers

from kvtier import ReAttentionCache, ReAttentionConfig
from tests.conftest import random_ids, tiny_model


def test_unsupported_family_raises():
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=128)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="supports the llama, mistral, qwen2, qwen3"):
        ReAttentionCache(model)


def test_model_without_rotary_raises():
    model = tiny_model("llama")
    del model.get_decoder().rotary_emb
    with pytest.raises(ValueError, match="no rotary embedding"):
        ReAttentionCache(model)


def test_scope_larger_than_the_window_raises():
    model = tiny_model("llama", window=256)
    with pytest.raises(ValueError, match="exceeds the model's 256-token window; lower top_k"):
        ReAttentionCache(model, global_size=8, local_size=128, span_size=8, top_k=32, chunk_size=16)
    cache = ReAttentionCache(
        model, global_size=8, local_size=128, span_size=8, top_k=32, chunk_size=16, allow_exceeding_window=True
    )
    assert cache.config.scope_bound == 8 + 256 + 128 + 3 * 8  # and a local window growing 3 spans between seals


def test_defaults_are_derived_from_the_window():
    cache = ReAttentionCache(tiny_model("qwen3", window=8192))
    assert cache.config == ReAttentionConfig().resolve(8192)
    assert cache.config.scope_bound <= 8192


def test_config_sources_agree(tmp_path):
    model = tiny_model("llama")
    fields = dict(global_size=4, local_size=32, span_size=4, top_k=2, chunk_size=8, policy="mean")
    path = tmp_path / "kv.yaml"
    ReAttentionConfig(**fields).to_file(path)
    configs = [
        ReAttentionCache(model, ReAttentionConfig(**fields)).config,
        ReAttentionCache(model, fields).config,
        ReAttentionCache(model, path).config,
        ReAttentionCache(model, str(path)).config,
        ReAttentionCache(model, **fields).config,
        ReAttentionCache(model, ReAttentionConfig(policy="quest"), **fields).config,
    ]
    assert all(config == configs[0] for config in configs)


def test_wrong_config_type_and_unknown_override_raise():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="config must be a ReAttentionConfig"):
        ReAttentionCache(model, 42)
    with pytest.raises(ValueError, match="unknown kvtier config field"):
        ReAttentionCache(model, topk=3)


def test_a_cache_holds_one_batch_size():
    model = tiny_model("llama")
    cache = ReAttentionCache(model, global_size=4, local_size=32, span_size=4, top_k=2, chunk_size=8)
    with torch.inference_mode():
        model(random_ids(20, batch=2), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="use a new cache for a new batch"):
            model(random_ids(5, batch=3), past_key_values=cache, use_cache=True)
