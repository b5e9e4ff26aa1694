"""Rows and rollback: beam search, several sequences per prompt, reordering a cache's rows (spans shared by uid, never
copied) and crop (assisted generation). Inside the window everything equals a DynamicCache; beyond it, a cache whose
rows were reordered continues exactly as a cache prefilled with those rows."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvtier import ReAttentionCache
from tests.conftest import greedy, random_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)
COVERING = dict(TINY, top_k=64)  # every sealed span selected: the scope is the whole context, as a DynamicCache's
SPAN_BYTES = 2 * 2 * 4 * 16 * 4  # K and V, 2 KV heads, 4 tokens, head_dim 16, float32


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _generate(model, ids: torch.Tensor, cache, new_tokens: int = 10, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)


def _prefill(model, cache, ids: torch.Tensor):
    """Feed ids [B, T] through one forward; -> the cache."""
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


def _spy_crops(cache) -> list[int]:
    """Record the argument of every cache.crop call (on this instance), still cropping."""
    calls, crop = [], cache.crop

    def recording(max_length):
        calls.append(max_length)
        crop(max_length)

    cache.crop = recording
    return calls


def _layer_equal(a, b) -> bool:
    """Two ReAttentionLayers hold the same tokens: global, local window, summaries (uids may differ)."""
    pairs = [(a.global_region.view(), b.global_region.view()), (a.local.view(), b.local.view()),
             ((a.table.summaries.view(),), (b.table.summaries.view(),))]
    return a.seen == b.seen and all(torch.equal(x, y) for left, right in pairs for x, y in zip(left, right))


# ---- inside the window: exactly a DynamicCache ----------------------------------------------------------------------
@pytest.mark.parametrize("sequences", [1, 2])
def test_beam_search_inside_the_window_equals_a_dynamic_cache(model, sequences):
    ids = random_ids(40, batch=2, seed=2)
    beams = dict(num_beams=3, num_return_sequences=sequences, do_sample=False)
    stock = _generate(model, ids, DynamicCache(config=model.config), **beams)
    ours = _generate(model, ids, ReAttentionCache(model), **beams)
    assert ours.shape[0] == 2 * sequences and torch.equal(ours, stock)


def test_several_samples_per_prompt_inside_the_window_equal_a_dynamic_cache(model):
    ids = random_ids(40, batch=2, seed=3)
    torch.manual_seed(7)
    stock = _generate(model, ids, DynamicCache(config=model.config), do_sample=True, num_return_sequences=3)
    torch.manual_seed(7)
    ours = _generate(model, ids, ReAttentionCache(model), do_sample=True, num_return_sequences=3)
    assert ours.shape[0] == 6 and torch.equal(ours, stock)


@pytest.mark.parametrize("drafter", ["assistant model", "prompt lookup"])
def test_assisted_generation_inside_the_window_equals_a_dynamic_cache(model, drafter):
    prompt = random_ids(12, seed=4)
    if drafter == "assistant model":
        ids, draft = prompt, dict(assistant_model=tiny_model("llama", seed=1))
    else:  # a repetitive prompt, so that lookups find drafts (of several tokens)
        ids, draft = prompt.repeat(1, 4), dict(prompt_lookup_num_tokens=4)
    stock = _generate(model, ids, DynamicCache(config=model.config), new_tokens=20, do_sample=False, **draft)
    cache = ReAttentionCache(model)
    assert cache.is_croppable
    crops = _spy_crops(cache)
    ours = _generate(model, ids, cache, new_tokens=20, do_sample=False, **draft)
    assert torch.equal(ours, stock)
    assert any(count < 0 for count in crops)  # rejected drafts were removed from the cache
    assert cache.get_seq_length() == ours.shape[1] - 1 and torch.equal(cache.token_ids, ours[:, :-1])


# ---- beyond the window: kept rows continue as a cache prefilled with them -------------------------------------------
ROW_OPS = {
    "reorder_cache": (lambda cache: cache.reorder_cache(torch.tensor([1, 0, 0, 1])), [1, 0, 0, 1]),
    "batch_repeat_interleave": (lambda cache: cache.batch_repeat_interleave(2), [0, 0, 1, 1]),
    "batch_select_indices": (lambda cache: cache.batch_select_indices([1]), [1]),
}


def _rows_kept_continue_as_prefilled(model, cache, op: str) -> None:
    """Prefill two distinct prompts (but their last token) and apply the row operation `op`: no span is copied (rows
    name the old spans by uid), every layer then holds what a cache prefilled with those rows holds, and greedy
    decoding gives that cache's tokens."""
    apply, rows = ROW_OPS[op]
    prompts = random_ids(100, batch=2, seed=5)
    _prefill(model, cache, prompts[:, :-1])
    uids_before = [layer.table.uids_host.view().clone() for layer in cache.layers]
    spans_before = cache.placement.uids
    apply(cache)
    assert cache.placement.uids == spans_before
    for layer, uids in zip(cache.layers, uids_before):
        assert len(layer.table) > 0 and torch.equal(layer.table.uids_host.view(), uids[rows])
        assert torch.equal(layer.table.uids.view(), uids[rows]) and layer.batch == len(rows)
    ids = prompts[rows]
    assert torch.equal(cache.token_ids, ids[:, :-1])
    reference = ReAttentionCache(model, policy=cache.config.policy, **TINY)
    for ours, theirs in zip(cache.layers, reference.layers):  # attended as ours is (chunk by chunk where spans spill),
        theirs.batches_forwards = ours.gathers_chunks_at_once()  # so the same to the bit
    reference = _prefill(model, reference, ids[:, :-1])
    reference.batch_select_indices(list(range(len(rows))))  # its repeated prompts were held once: one state per row
    assert all(_layer_equal(ours, theirs) for ours, theirs in zip(cache.layers, reference.layers))
    assert torch.equal(greedy(model, ids, cache, new_tokens=24), greedy(model, ids, reference, new_tokens=24))


@pytest.mark.parametrize("policy", ["consensus", "quest"])
@pytest.mark.parametrize("op", list(ROW_OPS))
def test_rows_kept_beyond_the_window_continue_as_a_cache_prefilled_with_them(model, op, policy):
    _rows_kept_continue_as_prefilled(model, ReAttentionCache(model, policy=policy, **TINY), op)


@pytest.mark.parametrize("policy", ["consensus", "quest"])
def test_beam_search_beyond_the_window(model, policy):
    """Selecting every span, beams equal a DynamicCache's; selecting few, they still run and return every sequence."""
    ids = random_ids(120, batch=2, seed=6)
    beams = dict(num_beams=3, num_return_sequences=2, do_sample=False)
    stock = _generate(model, ids, DynamicCache(config=model.config), **beams)
    covering = ReAttentionCache(model, policy=policy, **COVERING)
    assert torch.equal(_generate(model, ids, covering, **beams), stock)
    assert len(covering.layers[0].table) > 0
    cache = ReAttentionCache(model, policy=policy, **TINY)
    out = _generate(model, ids, cache, **beams)
    assert out.shape == (4, 130) and cache.layers[0].batch == 6 and len(cache.layers[0].table) > 0


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_rows_kept_with_spans_spilled_to_host_and_lmdb(model, tmp_path, tier):
    budgets = {"gpu_budget": 32 * SPAN_BYTES}
    if tier == "disk":
        budgets |= {"host_budget": 32 * SPAN_BYTES, "disk_path": str(tmp_path / "spill")}
    cache = ReAttentionCache(model, policy="quest", **TINY, **budgets)
    _rows_kept_continue_as_prefilled(model, cache, "reorder_cache")
    spans = cache.stats()["spans"]
    assert spans["host"] > 0 and (tier == "host" or spans["disk"] > 0)
    cache.close()


@pytest.mark.parametrize("order", ["saved then reordered", "reordered then saved"])
def test_rows_kept_across_save_and_load(model, tmp_path, order):
    prompts = random_ids(100, batch=2, seed=5)
    ids = prompts[[1, 0, 0, 1]]
    cache = _prefill(model, ReAttentionCache(model, policy="quest", **TINY), prompts[:, :-1])
    distinct = cache.placement.stats()["spans"]["gpu"]
    if order == "reordered then saved":  # rows 1 and 2 share their spans (and 0 and 3): the file holds each once
        cache.reorder_cache(torch.tensor([1, 0, 0, 1]))
    cache.save(tmp_path / "ctx.lmdb")
    loaded = ReAttentionCache.load(tmp_path / "ctx.lmdb", model)
    assert loaded.placement.stats()["spans"]["disk"] == distinct
    if order == "saved then reordered":  # the spans are read from the saved file
        loaded.reorder_cache(torch.tensor([1, 0, 0, 1]))
    assert torch.equal(loaded.token_ids, ids[:, :-1])
    fresh = _prefill(model, ReAttentionCache(model, policy="quest", **TINY), ids[:, :-1])
    assert torch.equal(greedy(model, ids, loaded, new_tokens=16), greedy(model, ids, fresh, new_tokens=16))
    loaded.close()


def test_batch_select_indices_refuses_rows_out_of_range(model):
    cache = _prefill(model, ReAttentionCache(model, **TINY), random_ids(30, batch=2))
    for bad in ([2], [-1], [[0, 1]], [0.5]):
        with pytest.raises(ValueError, match="row numbers 0..1"):
            cache.batch_select_indices(bad)
    assert cache.layers[0].batch == 2


# ---- a cache holding a prompt ---------------------------------------------------------------------------------------
def test_beams_on_a_cache_holding_a_prompt_need_it_repeated_first(model):
    prompt, question = random_ids(50, seed=8), random_ids(10, seed=9)
    beams = dict(num_beams=2, do_sample=False)
    cache = _prefill(model, ReAttentionCache(model), prompt)  # inside the window: a DynamicCache's tokens
    conversation = torch.cat([prompt, question], dim=-1)
    with pytest.raises(ValueError, match=r"cache\.batch_repeat_interleave\(n\)"):
        _generate(model, conversation, cache, **beams)
    assert cache.get_seq_length() == 50 and torch.equal(cache.token_ids, prompt)  # unchanged, still usable
    stock = _prefill(model, DynamicCache(config=model.config), prompt)
    cache.batch_repeat_interleave(2)
    stock.batch_repeat_interleave(2)
    assert torch.equal(_generate(model, conversation, cache, **beams), _generate(model, conversation, stock, **beams))


def test_samples_share_a_prompt_prefilled_once(model):
    """The README's recipe: prefill once, batch_repeat_interleave(3), then sample 3 answers: the stock cache's samples
    inside the window; beyond it, 3 rows naming the prompt's spans and no span stored twice."""
    prompt = random_ids(120, seed=8)
    samples = dict(do_sample=True, num_return_sequences=3)

    def sampled(cache):
        cache.batch_repeat_interleave(3)
        torch.manual_seed(5)
        return _generate(model, prompt, cache, **samples)

    inside = sampled(_prefill(model, ReAttentionCache(model), prompt[:, :-1]))
    assert torch.equal(inside, sampled(_prefill(model, DynamicCache(config=model.config), prompt[:, :-1])))
    beyond = _prefill(model, ReAttentionCache(model, **TINY), prompt[:, :-1])
    stored, prompt_spans = beyond.placement.stats()["spans"]["gpu"], len(beyond.layers[0].table)
    assert sampled(beyond).shape[0] == 3
    uids = beyond.layers[0].table.uids_host.view()  # [3, spans]
    assert torch.equal(uids[0, :prompt_spans], uids[2, :prompt_spans])  # the prompt's spans, named by every row
    sealed_since = 3 * (len(beyond.layers[0].table) - prompt_spans) * len(beyond.layers)  # each row's answer spans
    assert beyond.placement.stats()["spans"]["gpu"] == stored + sealed_since  # the prompt's are stored once


# ---- crop -----------------------------------------------------------------------------------------------------------
def _logits(model, cache, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, past_key_values=cache, use_cache=True).logits


def test_crop_of_a_rejected_draft_equals_never_feeding_it(model):
    """Beyond the window: a draft of 6 tokens fed, cropped, then the accepted tokens fed: the logits and what follows
    are exactly those of a cache that never saw the draft (feeding 6 tokens seals only older ones)."""
    prompt, draft, accepted = random_ids(100, seed=10), random_ids(6, seed=11), random_ids(6, seed=12)
    never = _prefill(model, ReAttentionCache(model, policy="quest", **TINY), prompt)
    cache = _prefill(model, ReAttentionCache(model, policy="quest", **TINY), prompt)
    _logits(model, cache, draft)
    cache.crop(-6)
    assert cache.get_seq_length() == 100 and torch.equal(cache.token_ids, prompt)
    assert torch.equal(_logits(model, cache, accepted[:, :-1]), _logits(model, never, accepted[:, :-1]))
    assert all(_layer_equal(ours, theirs) for ours, theirs in zip(cache.layers, never.layers))
    ids = torch.cat([prompt, accepted], dim=-1)  # generate feeds its last token
    assert torch.equal(greedy(model, ids, cache, new_tokens=12), greedy(model, ids, never, new_tokens=12))


def test_crop_reaches_into_the_global_region_while_nothing_is_sealed(model):
    prompt, draft = random_ids(10, seed=13), random_ids(6, seed=14)
    cache = _prefill(model, ReAttentionCache(model, **TINY), prompt)  # global 4, local 6
    _logits(model, cache, draft)
    cache.crop(-14)
    layer = cache.layers[0]
    assert (layer.global_region.length, layer.local.length, cache.get_seq_length()) == (2, 0, 2)
    assert torch.equal(cache.token_ids, prompt[:, :2])
    never = _prefill(model, ReAttentionCache(model, **TINY), prompt[:, :2])
    torch.testing.assert_close(_logits(model, cache, prompt[:, 2:-1]), _logits(model, never, prompt[:, 2:-1]),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy(model, prompt, cache, new_tokens=12), greedy(model, prompt, never, new_tokens=12))


def test_crop_reaching_sealed_spans_raises_and_changes_nothing(model):
    prompt = random_ids(100, seed=15)
    cache = _prefill(model, ReAttentionCache(model, **TINY), prompt[:, :-1])
    held, window = cache.get_seq_length(), cache.layers[0].local.length
    with pytest.raises(ValueError, match=f"only the {window} newest are still in its local window"):
        cache.crop(-(window + 1))
    with pytest.raises(ValueError, match="holds 99"):
        cache.crop(-100)
    assert cache.get_seq_length() == held and cache.layers[0].local.length == window
    untouched = _prefill(model, ReAttentionCache(model, **TINY), prompt[:, :-1])
    assert torch.equal(greedy(model, prompt, cache, new_tokens=12), greedy(model, prompt, untouched, new_tokens=12))


def test_a_positive_crop_keeps_that_many_tokens(model):
    prompt = random_ids(60, seed=16)
    kept = _prefill(model, ReAttentionCache(model, **TINY), prompt)
    removed = _prefill(model, ReAttentionCache(model, **TINY), prompt)
    kept.crop(55)
    removed.crop(-5)
    kept.crop(70)  # holds fewer: nothing to do
    kept.crop(0)
    assert kept.get_seq_length() == 55 and torch.equal(kept.token_ids, prompt[:, :55])
    assert all(_layer_equal(a, b) for a, b in zip(kept.layers, removed.layers))
