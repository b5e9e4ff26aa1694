"""Invariant on the real model: with a ~1K-token scope over a ~3K-token haystack, the needle can only reach the
answer through selection. The default policy and `reattention` find it; `streaming` (no middle) cannot. And in
natural prose at 12K tokens (1.5x the window), the defaults find RULER's needle from the middle of the text."""
from __future__ import annotations

import pytest
import torch

from kvtier import ReAttentionCache
from kvtier.tools.corpus import tokenized_corpus
from kvtier.tools.haystack import build_sample, passkey_found
from kvtier.tools.tasks import build_task_sample
from kvtier.tools.model import ModelNotInstalledError, load_smollm2
from kvtier.tools.niah import answer, answer_batch

pytestmark = pytest.mark.real_model

# 32 + 16 x 32 + 512 = 1056 tokens, + 96 while the local window grows to a group of 4 spans
SCOPE = dict(global_size=32, local_size=512, span_size=32, top_k=16)


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_smollm2()
    except ModelNotInstalledError as err:
        pytest.skip(f"the real model is not installed here: {err}")


@pytest.fixture(scope="module")
def haystack(smollm2):
    _, tokenizer = smollm2
    sample = build_sample(tokenizer, 3000, 0.4, "58361")
    middle = range(SCOPE["global_size"], sample.length - SCOPE["local_size"])
    assert sample.needle_start in middle  # neither a global nor a local token: only selection can bring it
    return sample


@pytest.mark.parametrize("policy", [None, "reattention"], ids=["default", "reattention"])
def test_selection_brings_the_needle_back(smollm2, haystack, policy):
    model, tokenizer = smollm2
    cache = ReAttentionCache(model, **SCOPE, **({"policy": policy} if policy else {}))
    text = tokenizer.decode(answer(model, haystack.ids, cache, max_new_tokens=8).tokens)
    assert passkey_found(text, haystack.key), text
    stats = cache.stats()
    assert stats["scope_tokens"] <= 1056 + 96 == cache.config.scope_bound and stats["tokens"] >= haystack.length


def test_streaming_cannot_see_the_needle(smollm2, haystack):
    model, tokenizer = smollm2
    cache = ReAttentionCache(model, policy="streaming", **SCOPE)
    text = tokenizer.decode(answer(model, haystack.ids, cache, max_new_tokens=8).tokens)
    assert not passkey_found(text, haystack.key), text


def test_stock_finds_it_at_this_length(smollm2, haystack):
    """The haystack is inside the model's window, so the stock model is the ceiling the selection must reach."""
    model, tokenizer = smollm2
    ids = torch.tensor([haystack.ids])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert passkey_found(tokenizer.decode(out[0, ids.shape[1] :]), haystack.key)


def test_the_defaults_find_needles_in_prose_beyond_the_window(smollm2):
    """RULER's niah_single in the packaged prose, 12K tokens (1.5x the window), needles at 40%, 55% and 70% depth in
    three rows of one batch: far from the global tokens and the local window, so only the selection brings them into
    the scope (stock SmolLM2 cannot read 12K tokens)."""
    model, tokenizer = smollm2
    corpus = tokenized_corpus(tokenizer)
    samples = [build_task_sample(corpus, 12288, depth, "niah_single", draw=f"0:12288:{depth}:0")
               for depth in (0.4, 0.55, 0.7)]
    config = ReAttentionCache(model).config
    for sample in samples:
        (start, end), = sample.needle_spans
        assert config.global_size < start and end < sample.length - config.local_size
    answers = answer_batch(model, [sample.ids for sample in samples], ReAttentionCache(model), max_new_tokens=12)
    texts = [tokenizer.decode(tokens) for tokens in answers.tokens]
    assert [sample.needles[0].value in text for sample, text in zip(samples, texts)] == [True] * 3, texts
