"""Padded batches: left padding is honoured everywhere (a row of a padded batch = the row alone, inside the window =
the stock cache's row alone), right padding and holes are refused by name, and tiers and save/load hold."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvtier import ReAttentionCache
from kvtier.layer import ReAttentionLayer
from kvtier.padding import leading_pads
from tests.conftest import greedy, random_ids, tiny_model
from tests.tiers.test_tiers import _budgets

TINY = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)
LENGTHS = (60, 100, 150)


def left_padded(lengths=LENGTHS, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Rows of `lengths` tokens, left-padded with token 0 -> (ids [B, T], mask [B, T], the rows alone [1, n])."""
    rows = [random_ids(n, seed=seed + i) for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[1] :], mask[i, width - row.shape[1] :] = row[0], 1
    return ids, mask, rows


def prefill(model, ids, cache, mask=None):
    with torch.inference_mode():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)


def test_inside_the_window_each_row_equals_the_stock_cache_on_the_row_alone(family):
    model = tiny_model(family)
    ids, mask, rows = left_padded()
    cache = ReAttentionCache(model)
    together = greedy(model, ids, cache, attention_mask=mask)
    assert cache.padded and cache.pads == [90, 50, 0]
    for i, row in enumerate(rows):
        assert torch.equal(together[i : i + 1], greedy(model, row, DynamicCache()))


@pytest.mark.parametrize("policy", ["consensus", "quest"])
def test_beyond_the_window_each_row_equals_the_row_alone(policy):
    model = tiny_model("llama")
    ids, mask, rows = left_padded()
    together = greedy(model, ids, ReAttentionCache(model, policy=policy, **TINY), attention_mask=mask, new_tokens=30)
    for i, row in enumerate(rows):
        alone = greedy(model, row, ReAttentionCache(model, policy=policy, **TINY), new_tokens=30)
        assert torch.equal(together[i : i + 1], alone)


def test_pads_never_reach_a_row_its_global_region_starts_at_its_first_token():
    model = tiny_model("llama")
    ids, mask, rows = left_padded()
    cache = ReAttentionCache(model, **TINY)
    prefill(model, ids, cache, mask)
    assert cache.get_seq_length() == ids.shape[1]  # the columns, as the mask and cache positions count them
    for i, row in enumerate(rows):
        alone = ReAttentionCache(model, **TINY)
        prefill(model, row, alone)
        for padded_layer, alone_layer in zip(cache.streams()[i][0], alone.layers):
            assert padded_layer.seen == row.shape[1]
            assert len(padded_layer.table) == len(alone_layer.table)
            for mine, theirs in zip(padded_layer.global_region.view(), alone_layer.global_region.view()):
                assert torch.allclose(mine, theirs, atol=1e-5)
    stats = cache.stats()
    assert stats["max_position"] < cache.config.scope_bound


def test_rows_of_equal_length_keep_the_batched_path():
    model = tiny_model("llama")
    ids = random_ids(80, batch=2)
    cache = ReAttentionCache(model, **TINY)
    greedy(model, ids, cache, attention_mask=torch.ones_like(ids), new_tokens=4)
    assert not cache.padded and all(isinstance(layer, ReAttentionLayer) for layer in cache.layers)


def test_a_padded_prefill_in_pieces_equals_one_piece():
    """Pieces of 36 columns cut the rows' tokens anywhere (pads 90 and 50): query chunks still fall where the one-piece
    prefill's do, but for the last of a piece, which ends where the piece does (row 0: tokens 48-54 of the chunk 48-60),
    and row 0 gets nothing but pads in the first pieces. That chunk attends before the rest of its chunk is taken in,
    so what the rest would have sealed is still in its local window: at most one span with seal_group 1, and the greedy
    tokens stay the one-piece prefill's; up to seal_group spans otherwise, which changes them on this tiny random
    model."""
    model = tiny_model("llama")
    ids, mask, _ = left_padded()
    scope = dict(TINY, seal_group=1)
    whole = greedy(model, ids, ReAttentionCache(model, **scope), attention_mask=mask)
    pieces = greedy(model, ids, ReAttentionCache(model, **scope), attention_mask=mask, prefill_chunk_size=36)
    assert torch.equal(whole, pieces)


def test_a_next_turn_appended_to_every_row_equals_the_rows_alone():
    model = tiny_model("llama")
    ids, mask, rows = left_padded()
    cache = ReAttentionCache(model, **TINY)
    first = greedy(model, ids, cache, attention_mask=mask, new_tokens=6)
    turn = random_ids(20, batch=3, seed=11)
    history = torch.cat([ids, first[:, :-1]], 1)  # the last generated token was never fed
    follow = torch.cat([history, first[:, -1:], turn], 1)
    second = greedy(model, follow, cache, attention_mask=torch.cat([mask, torch.ones_like(follow[:, ids.shape[1] :])], 1))
    for i, row in enumerate(rows):
        alone = ReAttentionCache(model, **TINY)
        first_alone = greedy(model, row, alone, new_tokens=6)
        assert torch.equal(first_alone, first[i : i + 1])
        second_alone = greedy(model, torch.cat([row, first_alone, turn[i : i + 1]], 1), alone)
        assert torch.equal(second_alone, second[i : i + 1])


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_padded_batch_spilled_to_the_tiers_generates_what_it_does_on_the_device(tmp_path, tier):
    model = tiny_model("llama")
    ids, mask, _ = left_padded((150, 260))
    on_device = greedy(model, ids, ReAttentionCache(model, **TINY), attention_mask=mask, new_tokens=30)
    cache = ReAttentionCache(model, **TINY, **_budgets(tmp_path, tier))
    spilled = greedy(model, ids, cache, attention_mask=mask, new_tokens=30)
    assert cache.stats()["moved"]["gpu->host"] > 0
    assert torch.equal(spilled, on_device)
    cache.close()


@pytest.mark.parametrize("policy", ["consensus", "quest"])
def test_a_saved_padded_batch_continues_as_the_unsaved_one(tmp_path, policy):
    model = tiny_model("llama")
    ids, mask, _ = left_padded()
    cache = ReAttentionCache(model, policy=policy, **TINY)
    prefill(model, ids, cache, mask)
    cache.save(tmp_path / "ctx.lmdb")
    follow = torch.cat([ids, random_ids(10, batch=3, seed=9)], 1)
    follow_mask = torch.cat([mask, torch.ones(3, 10, dtype=torch.long)], 1)
    expected = greedy(model, follow, cache, attention_mask=follow_mask)
    loaded = ReAttentionCache.load(tmp_path / "ctx.lmdb", model)
    assert loaded.padded and loaded.pads == [90, 50, 0] and loaded.get_seq_length() == ids.shape[1]
    assert torch.equal(loaded.token_ids, ids)
    assert torch.equal(greedy(model, follow, loaded, attention_mask=follow_mask), expected)
    loaded.close()


def test_a_loaded_consensus_cache_continues_its_query_window_in_order(tmp_path):
    """The observation window is a ring: saved oldest query first, a loaded cache overwrites the queries the saved one
    would (a prompt longer than the window wraps the ring)."""
    model = tiny_model("llama")
    ids = random_ids(150, seed=3)
    cache = ReAttentionCache(model, policy="consensus", **TINY)
    prefill(model, ids, cache)
    cache.save(tmp_path / "ctx.lmdb")
    follow = torch.cat([ids, random_ids(10, seed=9)], 1)
    expected = greedy(model, follow, cache)
    assert torch.equal(greedy(model, follow, ReAttentionCache.load(tmp_path / "ctx.lmdb", model)), expected)


@pytest.mark.parametrize(
    "holes, message",
    [
        ({1: slice(-5, None)}, 'padded on the right.*padding_side = "left"'),
        ({1: slice(10, 15)}, "holes"),
        ({0: slice(0, 3), 1: slice(-2, None)}, "padded on the right"),
    ],
)
def test_a_mask_that_is_not_left_padding_is_refused_and_the_cache_stays_usable(holes, message):
    model = tiny_model("llama")
    ids = random_ids(40, batch=2)
    bad = torch.ones_like(ids)
    for row, columns in holes.items():
        bad[row, columns] = 0
    cache = ReAttentionCache(model, **TINY)
    with pytest.raises(ValueError, match=message):
        greedy(model, ids, cache, attention_mask=bad)
    assert cache.get_seq_length() == 0 and cache.token_ids is None
    assert torch.equal(greedy(model, ids, cache), greedy(model, ids, ReAttentionCache(model, **TINY)))
    assert torch.equal(greedy(model, ids, DynamicCache()), greedy(model, ids, DynamicCache()))  # no hook left behind


def test_a_mask_that_disagrees_with_the_tokens_held_is_refused():
    model = tiny_model("llama")
    ids, mask, _ = left_padded()
    cache = ReAttentionCache(model, **TINY)
    prefill(model, ids, cache, mask)
    more = random_ids(4, batch=3, seed=5)
    changed = torch.cat([torch.ones_like(mask), torch.ones_like(more)], 1)
    with pytest.raises(ValueError, match="disagrees with the tokens this cache holds"):
        prefill(model, more, cache, changed)
    with pytest.raises(ValueError, match="pass the attention_mask with every forward"):
        prefill(model, more, cache)
    assert cache.get_seq_length() == ids.shape[1]
    prefill(model, more, cache, torch.cat([mask, torch.ones_like(more)], 1))
    assert cache.get_seq_length() == ids.shape[1] + 4


def test_a_batch_of_another_size_is_refused_and_the_cache_stays_usable():
    model = tiny_model("llama")
    ids, mask, _ = left_padded()
    cache = ReAttentionCache(model, **TINY)
    prefill(model, ids, cache, mask)
    with pytest.raises(ValueError, match="holds 3 sequences but got a batch of 2"):
        prefill(model, random_ids(4, batch=2), cache, torch.ones(2, ids.shape[1] + 4, dtype=torch.long))
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize(
    "mask, pads",
    [([[0, 0, 1, 1], [1, 1, 1, 1]], [2, 0]), ([[0, 0, 0, 0]], [4]), ([[1.0, 1.0]], [0])],
)
def test_leading_pads_counts_each_rows_pads(mask, pads):
    assert leading_pads(torch.tensor(mask)).tolist() == pads


def test_a_mask_of_another_rank_is_refused():
    with pytest.raises(ValueError, match="must be 2-D"):
        leading_pads(torch.ones(1, 1, 4, 4))


def beams(model, ids, cache, **kwargs) -> torch.Tensor:
    return greedy(model, ids, cache, new_tokens=12, num_beams=3, num_return_sequences=2, **kwargs)


def test_beams_of_a_padded_batch_inside_the_window_equal_the_stock_cache_on_each_row_alone(family):
    model = tiny_model(family)
    ids, mask, rows = left_padded()
    together = beams(model, ids, ReAttentionCache(model), attention_mask=mask)
    for i, row in enumerate(rows):
        assert torch.equal(together[2 * i : 2 * i + 2], beams(model, row, DynamicCache()))


@pytest.mark.parametrize("policy", ["consensus", "quest"])
def test_beams_of_a_padded_batch_beyond_the_window_equal_each_row_alone(policy):
    model = tiny_model("llama")
    ids, mask, rows = left_padded()
    cache = ReAttentionCache(model, policy=policy, **TINY)
    together = beams(model, ids, cache, attention_mask=mask)
    for i, row in enumerate(rows):
        assert torch.equal(together[2 * i : 2 * i + 2], beams(model, row, ReAttentionCache(model, policy=policy, **TINY)))
    assert cache.padded and len(cache.streams()) == 9  # 3 rows x 3 beams


def test_rows_of_a_padded_batch_selected_and_repeated_continue_as_those_rows_alone():
    model = tiny_model("llama")
    ids, mask, rows = left_padded()
    cache = ReAttentionCache(model, **TINY)
    prefill(model, ids, cache, mask)
    spans = cache.placement.stats()["spans"]
    cache.batch_select_indices([2, 0])
    cache.batch_repeat_interleave(2)
    assert cache.pads == [0, 0, 90, 90] and cache.placement.stats()["spans"] == spans  # no span copied
    more = random_ids(6, batch=4, seed=13)
    kept = ids[[2, 2, 0, 0]]
    out = greedy(model, torch.cat([kept, more], 1), cache,
                 attention_mask=torch.cat([mask[[2, 2, 0, 0]], torch.ones_like(more)], 1))
    for i, source in enumerate([2, 2, 0, 0]):
        alone = ReAttentionCache(model, **TINY)
        prefill(model, rows[source], alone)
        assert torch.equal(out[i : i + 1], greedy(model, torch.cat([rows[source], more[i : i + 1]], 1), alone))


def test_a_crop_of_a_padded_batch_undoes_the_last_tokens_of_every_row_or_none():
    """quest: a crop leaves consensus' observation window holding the removed tokens' queries (ReAttentionLayer.crop),
    which may change its later selections; a policy without state continues exactly as without the removed tokens."""
    model = tiny_model("llama")
    ids, mask, _ = left_padded()
    follow = random_ids(5, batch=3, seed=17)
    full_mask = torch.cat([mask, torch.ones_like(follow)], 1)
    expected = ReAttentionCache(model, **TINY, policy="quest")
    prefill(model, ids, expected, mask)
    expected_out = greedy(model, torch.cat([ids, follow], 1), expected, attention_mask=full_mask)
    cache = ReAttentionCache(model, **TINY, policy="quest")
    prefill(model, ids, cache, mask)
    draft = random_ids(3, batch=3, seed=19)
    prefill(model, draft, cache, torch.cat([mask, torch.ones_like(draft)], 1))
    with pytest.raises(ValueError, match="sealed into spans"):
        cache.crop(-cache.config.local_size - 3)
    assert cache.get_seq_length() == ids.shape[1] + 3
    cache.crop(-3)
    assert cache.get_seq_length() == ids.shape[1] and torch.equal(cache.token_ids, ids)
    assert torch.equal(greedy(model, torch.cat([ids, follow], 1), cache, attention_mask=full_mask), expected_out)
