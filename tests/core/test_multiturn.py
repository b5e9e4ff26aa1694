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
        conversation = torch.cat([conversation, turn], dim=-1)
        with torch.inference_mode():
            conversation = model.generate(conversation, attention_mask=torch.ones_like(conversation),
                                          past_key_values=cache, max_new_tokens=new_tokens, do_sample=False)
    return conversation


@pytest.mark.parametrize("policy", ["consensus", "quest"])
def test_three_turns_inside_the_window_equal_a_dynamic_cache(policy):
    model = tiny_model("llama")
    turns = [random_ids(60, seed=1), random_ids(20, seed=2), random_ids(15, seed=3)]
    stock = _chat(model, DynamicCache(config=model.config), turns, new_tokens=6)
    cache = ReAttentionCache(model, policy=policy)
    ours = _chat(model, cache, turns, new_tokens=6)
    assert torch.equal(ours, stock)
    assert cache.get_seq_length() == ours.shape[1] - 1 and len(cache.layers[0].table) == 0  # nothing left the scope
