"""Identical rows held once (kvtier.sharing): beams and samples of one prompt, or a prompt given twice in a batch,
prefill and store it once, and generate exactly what rows held apart generate."""
from __future__ import annotations

import pytest
import torch

from kvtier import ReAttentionCache
from tests.conftest import greedy, random_ids, tiny_model

TINY = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _prompt_spans(cache) -> int:
    return cache.placement.stats()["spans"]["gpu"]


def _spans_after_prefill(model, ids: torch.Tensor, **kwargs) -> int:
    cache = ReAttentionCache(model, **TINY)
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True, **kwargs)
    return _prompt_spans(cache)


@pytest.mark.parametrize("policy", ["consensus", "quest"])
def test_beams_of_one_prompt_equal_beams_over_rows_held_apart(model, policy):
    """Ids are shared (the prompt is held once); embeddings carry no ids, so the same beams run held apart."""
    prompt = random_ids(120, seed=4)
    beams = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, num_beams=3, num_return_sequences=2)
    shared = ReAttentionCache(model, policy=policy, **TINY)
    with torch.inference_mode():
        by_ids = model.generate(prompt, past_key_values=shared, **beams)[:, prompt.shape[1]:]
        apart = ReAttentionCache(model, policy=policy, **TINY)
        by_embeddings = model.generate(inputs_embeds=model.get_input_embeddings()(prompt), past_key_values=apart,
                                       **beams)
    assert torch.equal(by_ids, by_embeddings)


def test_a_prompt_given_twice_in_a_batch_is_stored_once_and_answered_as_alone(model):
    p0, p1 = random_ids(120, seed=4), random_ids(120, seed=5)
    batch = torch.cat([p0, p1, p0])
    assert _spans_after_prefill(model, batch) == _spans_after_prefill(model, torch.cat([p0, p1]))
    together = greedy(model, batch, ReAttentionCache(model, **TINY), new_tokens=20)
    for row, prompt in enumerate((p0, p1, p0)):
        assert torch.equal(together[row : row + 1], greedy(model, prompt, ReAttentionCache(model, **TINY), new_tokens=20))


def test_samples_split_at_the_first_different_token_and_keep_sharing_the_prompt_spans(model):
    prompt = random_ids(120, seed=4)
    cache = ReAttentionCache(model, **TINY)
    with torch.inference_mode():
        model(prompt.repeat(3, 1), past_key_values=cache, use_cache=True)
        assert cache.layers[0].batch == 1 and _prompt_spans(cache) == _spans_after_prefill(model, prompt)
        prompt_spans = len(cache.layers[0].table)
        model(torch.tensor([[1], [2], [1]]), past_key_values=cache, use_cache=True)  # the rows differ from here on
    assert cache.layers[0].batch == 3 and torch.equal(cache.token_ids[:, -1], torch.tensor([1, 2, 1]))
    uids = cache.layers[0].table.uids_host.view()[:, :prompt_spans]  # [3, spans]
    assert torch.equal(uids[0], uids[1]) and torch.equal(uids[1], uids[2])  # the prompt's spans, named by all rows


def test_a_prompt_prefilled_in_pieces_stays_shared(model):
    prompt = random_ids(150, seed=4)
    whole = greedy(model, prompt.repeat(2, 1), ReAttentionCache(model, **TINY), new_tokens=12)
    cache = ReAttentionCache(model, **TINY)
    pieces = greedy(model, prompt.repeat(2, 1), cache, new_tokens=12, prefill_chunk_size=25)
    assert torch.equal(whole, pieces) and torch.equal(pieces[0], pieces[1])
    assert _prompt_spans(cache) < 2 * _spans_after_prefill(model, prompt)  # the prompt's spans are stored once
