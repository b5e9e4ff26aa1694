"""The same cache across successive generate() calls (a chat: prompt, answer, next question), as transformers' own
caches allow: inside the window, exactly the tokens of a DynamicCache carried the same way (issue 18, item 3)."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvtier import ReAttentionCache
from tests.conftest import random_ids, tiny_model


def _chat(model, cache, turns: list[torch.Tensor], new_tokens: int) -> torch.Tensor:
    """Each turn's ids appended to the conversation so far, then `new_tokens` generated into the same cache."""
    conversation = torch.empty(1, 0, dtype=torch.long)
    for turn in turns:
        conversation = _next_turn(model, cache, conversation, turn, new_tokens)
    return conversation


def _next_turn(model, cache, conversation: torch.Tensor, turn: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The conversation [1, T] with `turn` [1, t] appended and `new_tokens` generated into `cache`."""
    conversation = torch.cat([conversation, turn], dim=-1)
    with torch.inference_mode():
        return model.generate(conversation, attention_mask=torch.ones_like(conversation), past_key_values=cache,
                              max_new_tokens=new_tokens, do_sample=False)


@pytest.mark.parametrize("policy", ["consensus", "quest"])
def test_three_turns_inside_the_window_equal_a_dynamic_cache(policy):
    model = tiny_model("llama")
    turns = [random_ids(60, seed=1), random_ids(20, seed=2), random_ids(15, seed=3)]
    stock = _chat(model, DynamicCache(config=model.config), turns, new_tokens=6)
    cache = ReAttentionCache(model, policy=policy)
    ours = _chat(model, cache, turns, new_tokens=6)
    assert torch.equal(ours, stock)
    assert cache.get_seq_length() == ours.shape[1] - 1 and len(cache.layers[0].table) == 0  # nothing left the scope


@pytest.mark.parametrize("policy", ["consensus", "quest"])
def test_turns_beyond_the_window_continue_the_same_after_a_save_and_load(tmp_path, policy):
    """A chat past the scope (spans sealed and selected): saving after the second turn and loading into a new cache
    for the third gives the conversation the same cache gives carried on."""
    model = tiny_model("llama")
    sizes = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12, policy=policy)
    turns = [random_ids(120, seed=1), random_ids(30, seed=2), random_ids(25, seed=3)]
    carried = _chat(model, ReAttentionCache(model, **sizes), turns, new_tokens=8)
    cache = ReAttentionCache(model, **sizes)
    two_turns = _chat(model, cache, turns[:2], new_tokens=8)
    assert len(cache.layers[0].table) > 3  # spans were sealed: the scope holds only part of the conversation
    cache.save(tmp_path / "chat.lmdb")
    loaded = ReAttentionCache.load(tmp_path / "chat.lmdb", model)
    assert torch.equal(loaded.token_ids, two_turns[:, :-1])  # the last answer token is not fed until the next turn
    resumed = _next_turn(model, loaded, two_turns, turns[2], new_tokens=8)
    assert torch.equal(resumed, carried)

