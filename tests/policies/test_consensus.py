"""The `consensus` policy: each span's attention mass from the centred observation window (against a float64 brute
force), summed over the layers of one query chunk (a new chunk votes afresh), neighbours pooled, decode steps reusing
the last selection for `refresh` steps; its options validated; and end to end in a tiny model: exact inside the scope,
row-independent in a batch, deterministic."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvtier import ReAttentionCache
from kvtier.policies import ConsensusPolicy, best_spans, build_policy
from tests.conftest import greedy, random_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)  # scope bound 4 + 3*4 + 24 = 40


# ---- helpers ----------------------------------------------------------------------------------------------------
def _reference_mass(window: torch.Tensor, keys: torch.Tensor, per_kv_head: bool) -> torch.Tensor:
    """The documented rule, one (query head, query) at a time, in float64: window [B, Hq, w, D], keys [B, Hkv, n, S, D]
    -> [B, Hsel, n]. Queries centred over the window when w > 1; a span's score is its best key's q . k (query head h
    reads KV head h // (Hq // Hkv)); softmax over spans at scale D**-0.5; summed over queries and each KV head's query
    heads, then over KV heads unless per_kv_head."""
    batch, hq, w, dim = window.shape
    hkv, n_spans = keys.shape[1], keys.shape[2]
    group = hq // hkv
    q = window.double()
    if w > 1:
        q = q - q.mean(2, keepdim=True)
    keys = keys.double()
    mass = torch.zeros(batch, hkv, n_spans, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            kv = h // group
            for t in range(w):
                scores = torch.tensor([max(float(q[b, h, t] @ key) for key in keys[b, kv, j]) for j in range(n_spans)],
                                      dtype=torch.float64)
                mass[b, kv] += torch.softmax(scores * dim ** -0.5, dim=0)
    return mass if per_kv_head else mass.sum(1, keepdim=True)


def _spans(scores: list[float], dim: int = 4, span: int = 2) -> torch.Tensor:
    """Keys [1, 1, n, S, D] whose span j's best key scores exactly scores[j] against the query e0 (its other keys score
    -1): key 0 of span j is scores[j] * e0, the rest -e0."""
    keys = torch.zeros(1, 1, len(scores), span, dim)
    keys[0, 0, :, 0, 0] = torch.tensor(scores, dtype=torch.float32)
    keys[0, 0, :, 1:, 0] = -1.0
    return keys


def _e(index: int, scale: float = 1.0, dim: int = 4) -> torch.Tensor:
    """One query [1, 1, 1, D]: scale * e_index."""
    q = torch.zeros(1, 1, 1, dim)
    q[..., index] = scale
    return q


def _voter(**options) -> ConsensusPolicy:
    """A consensus policy whose every pick is the vote's (span 0 not kept whatever its rank): for tests of the vote."""
    return ConsensusPolicy(keep_first_span=False, **options)


def _count_scorings(policy: ConsensusPolicy) -> list[int]:
    """Wrap the policy's window_mass so that calls to it are counted in the returned list (one entry per call)."""
    calls: list[int] = []
    original = policy.window_mass

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    policy.window_mass = counting
    return calls


# ---- 1. window_mass ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("w", [5, 1])
@pytest.mark.parametrize("span_block", [3, 1024])
def test_window_mass_matches_brute_force(per_kv_head, w, span_block):
    gen = torch.Generator().manual_seed(w * 10 + span_block)
    window = torch.randn(2, 6, w, 8, generator=gen)  # B=2, Hq=6, D=8
    keys = torch.randn(2, 2, 7, 4, 8, generator=gen)  # Hkv=2, n=7, S=4
    policy = ConsensusPolicy(span_block=span_block)
    mass = policy.window_mass(window, keys, per_kv_head)
    expected = _reference_mass(window, keys, per_kv_head)
    assert mass.dtype == torch.float32
    assert mass.shape == (2, 2 if per_kv_head else 1, 7)
    torch.testing.assert_close(mass.double(), expected, rtol=1e-5, atol=1e-5)
    # every (query, query head) spreads exactly one unit of attention over the spans
    torch.testing.assert_close(mass.sum((1, 2)), torch.full((2,), 6.0 * w), rtol=1e-5, atol=1e-5)


def test_window_mass_centres_queries_only_when_the_window_has_several():
    keys = torch.randn(1, 1, 5, 3, 4, generator=torch.Generator().manual_seed(3))
    policy = ConsensusPolicy()
    shift = torch.tensor([5.0, -2.0, 1.0, 3.0])
    window = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    # w > 1: a direction every query shares is removed, so it changes nothing
    torch.testing.assert_close(policy.window_mass(window + shift, keys, False), policy.window_mass(window, keys, False))
    # w == 1: no centring (it would zero the query and give every span the same mass)
    single = policy.window_mass(window[:, :, :1], keys, False)
    torch.testing.assert_close(single.double(), _reference_mass(window[:, :, :1], keys, False), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(single, torch.full_like(single, 1 / 5))


# ---- 2. cross-layer voting --------------------------------------------------------------------------------------
def test_layers_of_one_chunk_vote_and_a_new_chunk_votes_afresh():
    policy = _voter(window=1, neighbours=False)  # window 1: only a chunk's last query is in the window
    junk = _e(0, -50.0)  # each chunk's first query, dropped from the window: it would favour the lowest span
    # chunk 1 (10 tokens): layer 0 is sure of span 1, layer 1 mildly prefers span 3
    keys0, keys1 = _spans([0, 20, 0, 0, 0]), _spans([0, 2, 0, 4, 0])
    chunk = torch.cat((junk, _e(0)), 2)
    first = policy.select_at(chunk, keys0, 1, False, layer=0, tokens=10)
    second = policy.select_at(chunk, keys1, 1, False, layer=1, tokens=10)
    mass0, mass1 = policy.window_mass(_e(0), keys0, False), policy.window_mass(_e(0), keys1, False)
    assert first.tolist() == [[[1]]]
    assert best_spans(mass1, mass1, 1).tolist() == [[[3]]]  # layer 1 alone would read span 3
    assert second.tolist() == [[[1]]]  # with layer 0's vote it reads span 1
    assert torch.equal(second, best_spans(mass0 + mass1, mass0 + mass1, 1))

    # chunk 2 (22 tokens): both layers mildly prefer span 3; with chunk 1's votes still counted span 1 would win
    keys0b, keys1b = _spans([0, 1, 0, 2, 0]), _spans([0, 1, 0, 2, 0])
    first = policy.select_at(chunk, keys0b, 1, False, layer=0, tokens=22)
    second = policy.select_at(chunk, keys1b, 1, False, layer=1, tokens=22)
    mass0b, mass1b = policy.window_mass(_e(0), keys0b, False), policy.window_mass(_e(0), keys1b, False)
    stale = mass0 + mass1 + mass0b + mass1b
    assert best_spans(stale, stale, 1).tolist() == [[[1]]]
    assert first.tolist() == [[[3]]] and torch.equal(first, best_spans(mass0b, mass0b, 1))
    assert second.tolist() == [[[3]]] and torch.equal(second, best_spans(mass0b + mass1b, mass0b + mass1b, 1))


def test_earlier_chunks_of_one_forward_keep_their_layer_0_vote():
    """A prefill runs layer 0 over every chunk, then layer 1 over every chunk: layer 1's first chunk still adds to
    layer 0's vote for that chunk, not to layer 0's vote for the last one."""
    policy = _voter(window=1, neighbours=False)
    keys0a, keys0b, keys1a = _spans([0, 20, 0, 0]), _spans([0, 0, 20, 0]), _spans([0, 2, 0, 4])
    policy.select_at(_e(0), keys0a, 1, False, layer=0, tokens=10)
    policy.select_at(torch.cat((_e(1), _e(0)), 2), keys0b, 1, False, layer=0, tokens=20)
    ids = policy.select_at(torch.cat((_e(1), _e(0)), 2), keys1a, 1, False, layer=1, tokens=10)
    mass0a, mass1a = policy.window_mass(_e(0), keys0a, False), policy.window_mass(_e(0), keys1a, False)
    assert ids.tolist() == [[[1]]] and torch.equal(ids, best_spans(mass0a + mass1a, mass0a + mass1a, 1))


def test_layer_0_starts_a_fresh_vote_even_for_a_chunk_of_the_same_length():
    """A later forward whose chunk ends at the same token count (a new prompt in a reset cache) does not add to the
    finished forward's votes; votes of finished forwards are dropped."""
    policy = _voter(window=1, neighbours=False)
    chunk = torch.cat((_e(1), _e(0)), 2)
    old = _spans([0, 20, 0, 0, 0])
    policy.select_at(chunk, old, 1, False, layer=0, tokens=10)
    assert policy.select_at(chunk, old, 1, False, layer=1, tokens=10).tolist() == [[[1]]]
    keys0, keys1 = _spans([0, 1, 0, 2, 0]), _spans([0, 1, 0, 2, 0])
    first = policy.select_at(chunk, keys0, 1, False, layer=0, tokens=10)
    assert set(policy._votes) == {10}
    second = policy.select_at(chunk, keys1, 1, False, layer=1, tokens=10)
    mass0, mass1 = policy.window_mass(_e(0), keys0, False), policy.window_mass(_e(0), keys1, False)
    assert first.tolist() == [[[3]]]
    assert second.tolist() == [[[3]]] and torch.equal(second, best_spans(mass0 + mass1, mass0 + mass1, 1))


def test_votes_are_summed_per_kv_head_when_selecting_per_kv_head():
    gen = torch.Generator().manual_seed(7)
    queries = [torch.randn(2, 6, 3, 8, generator=gen) for _ in range(2)]
    keys = [torch.randn(2, 2, 9, 4, 8, generator=gen) for _ in range(2)]
    policy = _voter(neighbours=False, layout="text")
    policy.select_at(queries[0], keys[0], 3, True, layer=0, tokens=50)
    ids = policy.select_at(queries[1], keys[1], 3, True, layer=1, tokens=50)
    total = policy.window_mass(queries[0], keys[0], True) + policy.window_mass(queries[1], keys[1], True)
    assert ids.shape == (2, 2, 3)
    assert torch.equal(ids, best_spans(total, total, 3))


# ---- 3. neighbours ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("neighbours, top_k, scores, expected", [
    (True, 3, [0, 1, 0, 20, 0, 0, 5], [2, 3, 4]),  # the winner's neighbours come in, not the runners-up
    (False, 3, [0, 1, 0, 20, 0, 0, 5], [1, 6, 3]),  # laid out best last
    (True, 2, [0, 0, 0, 20, 1, 0, 0], [3, 4]),  # of the two neighbours, the one with more mass of its own
    (True, 2, [0, 0, 0, 20, 0, 0, 0], [2, 3]),  # equal neighbours: the lower id
    (False, 2, [0, 0, 0, 20, 0, 0, 5], [6, 3]),
])
def test_neighbours_of_the_best_span_share_its_score(neighbours, top_k, scores, expected):
    policy = _voter(neighbours=neighbours)
    ids = policy.select_at(_e(0), _spans(scores), top_k, False, layer=0, tokens=100)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[expected]]


def test_by_default_span_0_is_always_selected_and_sits_next_to_the_local_window():
    scores = [0.0, 0, 0, 20, 0, 0, 9]  # span 0 has no mass: the vote alone picks 3 and its neighbours, then 6
    ids = ConsensusPolicy().select_at(_e(0), _spans(scores), 4, False, layer=0, tokens=100)
    assert _voter().select_at(_e(0), _spans(scores), 4, False, layer=0, tokens=100).tolist() == [[[6, 2, 3, 4]]]
    assert ids.tolist() == [[[2, 3, 4, 0]]]  # span 0 ranked best, laid out last; 6, the last pick, goes


def test_keep_first_span_must_be_a_bool():
    with pytest.raises(ValueError, match="keep_first_span must be true or false, got 'yes'"):
        ConsensusPolicy(keep_first_span="yes")


def test_neighbours_with_a_single_span():
    ids = ConsensusPolicy().select_at(_e(0), _spans([3.0]), 4, False, layer=0, tokens=100)
    assert ids.tolist() == [[[0]]]


def test_no_spans_selects_nothing():
    ids = ConsensusPolicy().select_at(torch.randn(2, 6, 3, 8), torch.randn(2, 2, 0, 4, 8), 3, True, layer=0, tokens=8)
    assert ids.shape == (2, 2, 0) and ids.dtype == torch.long


# ---- 4. decode reuse --------------------------------------------------------------------------------------------
def test_decode_steps_reuse_the_selection_for_refresh_steps_then_rescore():
    keys = torch.zeros(1, 1, 4, 2, 4)
    keys[0, 0, 0, 0] = 8 * torch.eye(4)[1]  # span 0 answers e1
    keys[0, 0, 1, 0] = 8 * torch.eye(4)[2]  # span 1 answers e2
    policy = _voter(window=4, refresh=2, neighbours=False)
    calls = _count_scorings(policy)
    prefill = torch.cat((_e(1, 2.0), _e(1, -1.0), _e(1, -1.0)), 2)  # centred already: the first query wants span 0
    selected = policy.select_at(prefill, keys, 1, False, layer=0, tokens=30)
    assert selected.tolist() == [[[0]]] and len(calls) == 1

    step = _e(2, 5.0)  # a decode query that, scored, picks span 1
    assert _voter(neighbours=False).select_at(step, keys, 1, False, layer=0, tokens=31).tolist() == [[[1]]]
    for tokens in (31, 32):  # `refresh` steps reuse the selection, unscored
        reused = policy.select_at(step, keys, 1, False, layer=0, tokens=tokens)
        assert reused is selected and reused.tolist() == [[[0]]]
    assert len(calls) == 1

    rescored = policy.select_at(step, keys, 1, False, layer=0, tokens=33)  # step refresh + 1
    assert len(calls) == 2
    window = policy._layers[0].window
    assert window.shape == (1, 1, 4, 4)  # only the last `window` queries: one prefill query and three steps
    newest = torch.cat((_e(1, -1.0), step, step, step), 2)  # held in ring order: compare as a set of queries
    assert sorted(window[0, 0].tolist()) == sorted(newest[0, 0].tolist())
    expected = _reference_mass(window, keys, False)
    assert rescored.tolist() == [[[1]]] and torch.equal(rescored, best_spans(expected.float(), expected.float(), 1))

    again = policy.select_at(step, keys, 1, False, layer=0, tokens=34)  # the count starts again
    assert again is rescored and len(calls) == 2


def test_a_sealed_span_rescores_the_next_decode_step():
    """A decode step that brings a newly sealed span re-scores (the newest text becomes selectable) and the count to
    `refresh` starts again; with no new span it reuses."""
    keys = _spans([20, 0, 0, 0])
    policy = ConsensusPolicy(window=2, refresh=16, neighbours=False)
    calls = _count_scorings(policy)
    policy.select_at(torch.cat((_e(0), _e(1)), 2), keys[:, :, :3], 1, False, layer=0, tokens=10)
    policy.select_at(_e(0), keys[:, :, :3], 1, False, layer=0, tokens=11)
    assert len(calls) == 1
    policy.select_at(_e(0), keys, 1, False, layer=0, tokens=12)  # a fourth span was sealed
    assert len(calls) == 2 and policy._layers[0].steps == 0 and policy._layers[0].spans == 4
    assert policy.reuses_selection(0)


def test_a_multi_query_chunk_always_rescores():
    keys = _spans([0, 20, 0, 0])
    policy = ConsensusPolicy(window=2, refresh=16, neighbours=False)
    calls = _count_scorings(policy)
    policy.select_at(torch.cat((_e(1), _e(0)), 2), keys, 1, False, layer=0, tokens=10)
    policy.select_at(_e(0), keys, 1, False, layer=0, tokens=11)
    assert len(calls) == 1
    policy.select_at(torch.cat((_e(1), _e(0)), 2), keys, 1, False, layer=0, tokens=13)
    assert len(calls) == 2


def test_reuse_needs_a_selection_of_the_same_size():
    """With fewer spans than top_k the selection grows as spans are sealed: a decode step does not reuse a smaller
    one."""
    policy = ConsensusPolicy(neighbours=False)
    calls = _count_scorings(policy)
    ids = policy.select_at(torch.cat((_e(1), _e(0)), 2), _spans([1, 2]), 3, False, layer=0, tokens=20)
    assert ids.tolist() == [[[0, 1]]]
    ids = policy.select_at(_e(0), _spans([1, 2, 3]), 3, False, layer=0, tokens=21)
    assert ids.tolist() == [[[0, 1, 2]]] and len(calls) == 2


def test_each_layer_keeps_its_own_window_and_selection():
    policy = ConsensusPolicy(window=3, neighbours=False)
    policy.select_at(torch.randn(1, 2, 5, 4), torch.randn(1, 1, 6, 2, 4), 2, False, layer=0, tokens=40)
    policy.select_at(torch.randn(1, 2, 2, 4), torch.randn(1, 1, 6, 2, 4), 2, False, layer=1, tokens=40)
    assert policy._layers[0].window.shape == (1, 2, 3, 4)
    assert policy._layers[1].window.shape == (1, 2, 2, 4)


def test_the_window_ring_holds_the_newest_queries_without_copying_the_rest():
    policy = ConsensusPolicy(window=3, neighbours=False)
    keys = torch.randn(1, 1, 6, 2, 4)
    queries = [torch.full((1, 2, 1, 4), float(step)) for step in range(7)]
    policy.select_at(torch.cat(queries[:2], 2), keys, 2, False, layer=0, tokens=40)
    ring = policy._layers[0].ring
    for step, query in enumerate(queries[2:], start=2):
        policy.select_at(query, keys, 2, False, layer=0, tokens=40 + step)
        held = sorted(policy._layers[0].window[0, 0, :, 0].tolist())
        assert held == [float(s) for s in range(max(0, step - 2), step + 1)]
    assert policy._layers[0].ring is ring  # written in place, one buffer per layer


# ---- 5. validation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["window", "refresh", "stride", "span_block", "rank_offset"])
@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_options_must_be_positive_integers(option, bad):
    with pytest.raises(ValueError, match=rf"consensus policy: {option} must be a positive integer, got {bad!r}"):
        ConsensusPolicy(**{option: bad})


def test_build_policy_validates_consensus_options():
    with pytest.raises(ValueError, match="window must be a positive integer"):
        build_policy("consensus", {"window": 0})
    policy = build_policy("consensus", {"window": 8, "refresh": 3, "span_block": 2, "neighbours": False})
    assert isinstance(policy, ConsensusPolicy)
    assert (policy.window, policy.refresh, policy.span_block, policy.neighbours) == (8, 3, 2, False)


def test_vote_must_be_known():
    with pytest.raises(ValueError, match=r"consensus policy: vote must be one of \('mass', 'rank', 'log'\), got 'count'"):
        ConsensusPolicy(vote="count")


def test_a_rank_vote_counts_each_layer_by_rank_so_a_peaked_layer_cannot_outvote_the_others():
    # layer 0 and 1 prefer span 1 mildly; layer 2 piles its mass onto span 3
    keys = [_spans([0, 2, 0, 1.5, 0]), _spans([0, 2, 0, 1.5, 0]), _spans([0, 0, 0, 40, 0])]
    chosen = {}
    for vote in ("mass", "rank"):
        policy = _voter(window=1, neighbours=False, vote=vote, rank_offset=2)
        chosen[vote] = [policy.select_at(_e(0), layer_keys, 1, False, layer=layer, tokens=10).item()
                        for layer, layer_keys in enumerate(keys)]
    assert chosen["mass"] == [1, 1, 3]  # layer 2's mass outweighs the two layers before it
    assert chosen["rank"] == [1, 1, 1]  # by rank: span 1 has 1/2 + 1/2 + 1/4 against span 3's 1/3 + 1/3 + 1/2
    policy = _voter(vote="rank", rank_offset=2)
    mass = torch.tensor([[[0.1, 3.0, 0.1, 2.0, 0.0]]])
    assert torch.allclose(policy.layer_vote(mass), torch.tensor([[[1 / 4, 1 / 2, 1 / 5, 1 / 3, 1 / 6]]]))
    beyond = torch.tensor([[False, False, False, True, True]])  # spans 3 and 4 sealed after the chunk: mass 0
    masked = policy.layer_vote(torch.tensor([[[[0.1, 3.0, 0.1, 0.0, 0.0]]]]), beyond)
    assert torch.allclose(masked, torch.tensor([[[[1 / 3, 1 / 2, 1 / 4, 0, 0]]]]))  # as if spans 3, 4 did not exist


def test_layers_past_vote_layers_select_by_the_earlier_votes_and_score_nothing():
    # layers 0 and 1 prefer span 1 mildly; layer 2 piles its mass onto span 3
    keys = [_spans([0, 2, 0, 1.5, 0]), _spans([0, 2, 0, 1.5, 0]), _spans([0, 0, 0, 40, 0])]
    policy = _voter(window=1, neighbours=False, vote_layers=2)
    scored = []
    policy.window_mass = lambda *args, original=policy.window_mass: scored.append(1) or original(*args)
    chosen = [policy.select_at(_e(0), layer_keys, 1, False, layer=layer, tokens=10).item()
              for layer, layer_keys in enumerate(keys)]
    assert chosen == [1, 1, 1]  # every layer voting chooses [1, 1, 3] (test_a_rank_vote_counts_each_layer...)
    assert len(scored) == 2  # layer 2 scored nothing
    alone = _voter(window=1, neighbours=False, vote_layers=2)
    assert alone.select_at(_e(0), keys[2], 1, False, layer=2, tokens=10).item() == 3  # no earlier vote: it scores


@pytest.mark.parametrize("decode_selection, decoded", [("final", 3), ("layer", 1)])
def test_decode_steps_of_every_layer_reuse_the_whole_vote_s_selection(decode_selection, decoded):
    """With decode_selection "final" (the default) the last voting layer's selection, the whole vote's, becomes the
    earlier layers' too: a decode step reusing layer 0's selection reads what layers 1 and 2 read; with "layer" it
    reads layer 0's own."""
    keys = [_spans([0, 2, 0, 1.5, 0]), _spans([0, 0, 0, 40, 0]), _spans([0, 2, 0, 1.5, 0])]
    policy = _voter(window=1, neighbours=False, vote_layers=2, decode_selection=decode_selection)
    policy.num_layers = 3
    chosen = [policy.select_at(_e(0), layer_keys, 1, False, layer=layer, tokens=10).item()
              for layer, layer_keys in enumerate(keys)]
    assert chosen == [1, 3, 3]  # layer 0 alone reads span 1; the sum of layers 0 and 1 reads span 3
    calls = _count_scorings(policy)
    steps = [policy.select_at(_e(0), layer_keys, 1, False, layer=layer, tokens=11).item()
             for layer, layer_keys in enumerate(keys)]
    assert steps == [decoded, 3, 3] and not calls  # reused, nothing scored
    assert policy._layers[0].spans == 5 and policy.reuses_selection(0)


@pytest.mark.parametrize("decode_selection, layer_0", [("final", 1), ("final_all", 3)])
def test_a_re_scoring_decode_step_keeps_the_last_whole_vote_in_the_early_layers_with_final_all(decode_selection,
                                                                                             layer_0):
    """A decode step that brings a newly sealed span re-scores: with "final" layer 0 selects by its own vote again,
    with "final_all" it keeps the last whole vote's selection; either way it still votes, so the last voter selects by
    both layers' sum."""
    keys = [_spans([0, 2, 0, 1.5, 0]), _spans([0, 0, 0, 40, 0])]
    policy = _voter(window=1, neighbours=False, vote_layers=2, decode_selection=decode_selection)
    policy.num_layers = 2
    for layer, layer_keys in enumerate(keys):
        policy.select_at(_e(0), layer_keys, 1, False, layer=layer, tokens=10)
    sealed = [torch.cat((layer_keys, _spans([0])), 2) for layer_keys in keys]  # a sixth span, scoring 0
    calls = _count_scorings(policy)
    steps = [policy.select_at(_e(0), layer_keys, 1, False, layer=layer, tokens=11).item()
             for layer, layer_keys in enumerate(sealed)]
    masses = [policy.window_mass(_e(0), layer_keys, False) for layer_keys in sealed]
    assert steps == [layer_0, best_spans(masses[0] + masses[1], masses[0] + masses[1], 1).item()] == [layer_0, 3]
    assert len(calls) == 2 + 2  # both layers scored this step (and the masses above)
    assert policy._layers[0].spans == 6 and policy.reuses_selection(0)


def test_without_the_model_s_depth_every_layer_keeps_its_own_selection():
    """Outside a cache a policy whose every layer votes does not know its last layer: each keeps its own."""
    keys = [_spans([0, 2, 0, 1.5, 0]), _spans([0, 0, 0, 40, 0])]
    policy = _voter(window=1, neighbours=False, vote_layers=None)
    for layer, layer_keys in enumerate(keys):
        policy.select_at(_e(0), layer_keys, 1, False, layer=layer, tokens=10)
    assert [policy._layers[layer].selected.item() for layer in (0, 1)] == [1, 3]


def test_after_a_prompt_every_layer_of_a_cache_keeps_the_whole_vote_s_selection():
    model = tiny_model("llama", num_hidden_layers=4)  # the first 2 of 4 layers vote (0.6, rounded)
    kept = {}
    for decode_selection in ("final", "layer"):
        cache = ReAttentionCache(model, dict(TINY, policy="consensus",
                                             policy_options={"decode_selection": decode_selection,
                                                             "keep_first_span": False}))
        with torch.inference_mode():
            model(random_ids(70), past_key_values=cache)
        kept[decode_selection] = [cache.policy._layers[layer].selected.flatten().tolist() for layer in range(4)]
    assert kept["layer"][0] != kept["layer"][1]  # layer 0's own vote reads other spans than the whole vote
    assert kept["final"] == [kept["layer"][1]] * 4


def test_a_cache_s_default_consensus_reads_span_0_in_every_layer_and_decode_step():
    model = tiny_model("llama", num_hidden_layers=4)
    ids = random_ids(200)

    def selections(keep_first_span: bool) -> list[list[int]]:
        options = {"window": 4, "keep_first_span": keep_first_span}
        cache = ReAttentionCache(model, dict(TINY, policy="consensus", policy_options=options))
        with torch.inference_mode():
            model(ids, past_key_values=cache)
            held = [cache.policy._layers[layer].selected.flatten().tolist() for layer in range(4)]
            for token in range(3):
                model(ids[:, token:token + 1], past_key_values=cache)
                held += [cache.policy._layers[layer].selected.flatten().tolist() for layer in range(4)]
        return held

    assert not any(0 in chosen for chosen in selections(False))  # the premise: the vote alone leaves span 0 out
    assert all(chosen[-1] == 0 for chosen in selections(True))  # kept, ranked best: next to the local window


def test_decode_selection_must_be_known():
    expected = r"decode_selection must be one of \('final', 'layer', 'final_all'\), got 'own'"
    with pytest.raises(ValueError, match=expected):
        ConsensusPolicy(decode_selection="own")


@pytest.mark.parametrize("bad", [0, -2, 0.0, 1.5, True, "18"])
def test_vote_layers_must_be_a_count_a_share_or_null(bad):
    with pytest.raises(ValueError, match=rf"consensus policy: vote_layers must be a layer count .* got {bad!r}"):
        ConsensusPolicy(vote_layers=bad)


@pytest.mark.parametrize("vote_layers, layers, voting", [(0.6, 30, 18), (0.6, 32, 19), (0.1, 2, 1), (1.0, 4, 4),
                                                         (3, 30, 3), (None, 30, 30), (0.6, None, 5)])
def test_vote_layers_counts_or_shares_the_model_s_layers(vote_layers, layers, voting):
    policy = ConsensusPolicy(vote_layers=vote_layers)
    policy.num_layers = layers
    assert [policy._votes_at(layer) for layer in range(5 if layers is None else layers)].count(True) == voting


def test_the_cache_tells_the_policy_the_model_s_depth_and_60_percent_vote_by_default():
    model = tiny_model("llama")
    cache = ReAttentionCache(model)
    assert (cache.policy.num_layers, cache.policy.vote_layers) == (model.config.num_hidden_layers, 0.6)


def test_a_log_vote_counts_the_mass_over_a_uniform_share_compressed():
    policy = ConsensusPolicy(vote="log")
    mass = torch.tensor([[[1.0, 3.0, 0.0, 4.0]]])  # 8 units over 4 spans: a uniform share is 2
    assert torch.allclose(policy.layer_vote(mass), torch.log1p(torch.tensor([[[0.5, 1.5, 0.0, 2.0]]])))
    beyond = torch.tensor([[False, False, True, True]])  # 2 spans in the chunk's softmax: a uniform share is 2
    masked = policy.layer_vote(torch.tensor([[[[1.0, 3.0, 0.0, 0.0]]]]), beyond)
    assert torch.allclose(masked, torch.log1p(torch.tensor([[[[0.5, 1.5, 0.0, 0.0]]]])))


def test_layout_must_be_known():
    with pytest.raises(ValueError, match=r"consensus policy: layout must be one of \('text', 'best_last'\), got 'last'"):
        ConsensusPolicy(layout="last")


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_by_default_the_spans_text_order_selects_are_laid_out_best_last(per_kv_head):
    gen = torch.Generator().manual_seed(11)
    queries, keys = torch.randn(2, 6, 5, 8, generator=gen), torch.randn(2, 2, 12, 4, 8, generator=gen)
    text = _voter(neighbours=False, layout="text").select_at(queries, keys, 5, per_kv_head, layer=0, tokens=80)
    best_last = _voter(neighbours=False)  # the default layout
    ids = best_last.select_at(queries, keys, 5, per_kv_head, layer=0, tokens=80)
    assert torch.equal(ids.sort(-1).values, text)  # the same spans
    mass = best_last.window_mass(queries, keys, per_kv_head)
    assert torch.equal(ids, best_spans(mass, mass, 5, layout="best_last"))
    assert not torch.equal(ids, text)  # laid out otherwise


def test_consensus_summary_is_a_copy_of_the_keys():
    policy = ConsensusPolicy()
    keys = torch.randn(3, 2, 4, 8)
    summary = policy.summarise(keys)
    assert policy.summary_size(4) == 4
    assert torch.equal(summary, keys) and summary.data_ptr() != keys.data_ptr()


# ---- 6. end to end ----------------------------------------------------------------------------------------------
def test_inside_the_scope_generates_exactly_what_a_dynamic_cache_does():
    model = tiny_model("llama")
    ids = random_ids(30)  # 30 + 8 tokens: sealed spans, but never more than top_k of them
    cache = ReAttentionCache(model, policy="consensus", **TINY, seal_group=1)
    ours = greedy(model, ids, cache, new_tokens=8)
    stock = greedy(model, ids, DynamicCache(), new_tokens=8)
    assert torch.equal(ours, stock)
    assert len(cache.layers[0].table) > 0  # spans really were sealed, selected and gathered


def test_rows_of_a_batch_generate_what_each_row_does_alone():
    model = tiny_model("llama")
    ids = random_ids(100, batch=2)
    cache = ReAttentionCache(model, policy="consensus", **TINY)
    together = greedy(model, ids, cache, new_tokens=24)
    assert len(cache.layers[0].table) > TINY["top_k"]  # beyond the scope: selection chooses
    for row in range(2):
        alone = greedy(model, ids[row : row + 1], ReAttentionCache(model, policy="consensus", **TINY), new_tokens=24)
        assert torch.equal(together[row : row + 1], alone)


def test_generation_is_deterministic():
    model = tiny_model("llama")
    ids = random_ids(100)
    options = dict(policy="consensus", policy_options={"window": 8, "refresh": 4}, **TINY)
    first = greedy(model, ids, ReAttentionCache(model, **options), new_tokens=24)
    second = greedy(model, ids, ReAttentionCache(model, **options), new_tokens=24)
    assert torch.equal(first, second)


def test_a_reset_cache_generates_what_a_new_one_does():
    """The observation windows and selections of the first prompt are forgotten on reset."""
    model = tiny_model("llama")
    first, second = random_ids(100, seed=3), random_ids(60, seed=4)
    cache = ReAttentionCache(model, policy="consensus", **TINY)
    greedy(model, first, cache, new_tokens=8)
    cache.reset()
    fresh = greedy(model, second, ReAttentionCache(model, policy="consensus", **TINY), new_tokens=8)
    assert torch.equal(greedy(model, second, cache, new_tokens=8), fresh)
