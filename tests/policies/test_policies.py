"""Selection policies: a selection is int64, sorted, unique, in range, at most top_k spans; query head h reads KV head
h // group; `reattention` reproduces the paper's vote and `quest` an upper bound, against brute-force references."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import kvtier.policies as policies
from kvtier.policies import (
    AGGREGATIONS, Policy, best_run_last, best_spans, build_policy, dot_scores, policy_names, rank_spans, register_policy,
)

BATCH = 2
HEADS = [(9, 3), (4, 4), (8, 2)]  # (query heads, KV heads): a non-power-of-two group, MHA, GQA
# consensus ranks by its own window mass across layers: tests/policies/test_consensus.py checks it against brute force
SCORED = [name for name in policy_names() if name not in ("streaming", "consensus")]
POLICY_AGGREGATIONS = [(name, agg) for name in SCORED for agg in AGGREGATIONS] + [("streaming", None)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _policy(name: str, aggregation: str | None = None, **options) -> Policy:
    return build_policy(name, {**options, **({"aggregation": aggregation} if aggregation else {})})


def _inputs(hq, hkv, dim, n_spans=10, span=8, n_queries=6, seed=0):
    """Random (never zero) pre-RoPE queries [B, Hq, q, D] and middle keys [B, Hkv, n, S, D], span by span."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(BATCH, hq, n_queries, dim, generator=gen)
    keys = torch.randn(BATCH, hkv, n_spans, span, dim, generator=gen)
    return queries, keys


def _summaries(policy: Policy, keys: torch.Tensor) -> torch.Tensor:
    """keys [B, Hkv, n, S, D] -> summaries [B, Hkv, n, c, D], each sequence's spans summarised as sealed spans are."""
    batch, hkv, n_spans, span, dim = keys.shape
    c = policy.summary_size(span)
    flat = policy.summarise(keys.transpose(1, 2).reshape(batch * n_spans, hkv, span, dim))  # [B*n, Hkv, c, D]
    return flat.reshape(batch, n_spans, hkv, c, dim).transpose(1, 2)


def _paired(queries: torch.Tensor, per_kv_head_tensor: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, ...] -> [B, Hq, ...]: the KV head each query head reads, h // group (not h mod Hkv)."""
    hq, hkv = queries.shape[1], per_kv_head_tensor.shape[1]
    return per_kv_head_tensor[:, [h // (hq // hkv) for h in range(hq)]]


def _reference_scores(name: str, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Brute force in float64: each (query token, query head) against each span's candidates -> [B, Hq, q, n, m]."""
    q = queries.double()
    keys = _paired(queries, keys.double())  # [B, Hq, n, S, D]
    if name == "reattention":  # every middle token is a candidate
        candidates = keys
    elif name == "mean":
        candidates = keys.mean(3, keepdim=True)
    elif name == "infllm":  # its representatives are checked against brute force on their own, below
        candidates = _paired(queries, _summaries(_policy("infllm"), keys.float()).double())
    elif name == "quest":  # channel by channel, the larger of q*min and q*max, summed
        lo, hi = keys.amin(3), keys.amax(3)  # [B, Hq, n, D]
        qd = q[:, :, :, None, :]
        return torch.maximum(qd * lo[:, :, None], qd * hi[:, :, None]).sum(-1, keepdim=True)
    else:
        raise AssertionError(name)
    return torch.einsum("bhtd,bhncd->bhtnc", q, candidates)


def _require_gap(a: float, b: float, tol: float) -> None:
    assert abs(a - b) > tol, "the random test data sits on a near-tie: pick another seed"


def _reference_select(scores, group, top_k, per_kv_head, aggregation, votes=4, tol=1e-4):
    """The documented rule, one (query token, query head) at a time: scores [B, Hq, q, n, m] -> ids [B, Hsel, k].
    vote: each row votes for the spans holding its `votes` best candidates; max: a span's best candidate score;
    sum: the sum over rows of the span's best. Rank by that, ties to the higher best score, then the lower span id."""
    batch, hq, _, n_spans, m = scores.shape
    h_sel = hq // group if per_kv_head else 1
    k = min(top_k, n_spans)
    out = torch.empty(batch, h_sel, k, dtype=torch.long)
    for b in range(batch):
        for sel in range(h_sel):
            heads = [h for h in range(hq) if not per_kv_head or h // group == sel]
            rows = scores[b, heads].reshape(-1, n_spans, m)  # one row per (query head, query token)
            best = rows.amax(-1)  # [R, n]
            secondary = best.amax(0)
            if aggregation == "vote":
                primary = torch.zeros(n_spans, dtype=torch.float64)
                for row in rows.reshape(len(rows), -1):
                    ordered = row.sort(descending=True)
                    n_votes = min(votes, row.numel())
                    if n_votes < row.numel():
                        _require_gap(ordered.values[n_votes - 1].item(), ordered.values[n_votes].item(), tol)
                    for candidate in ordered.indices[:n_votes].tolist():
                        primary[candidate // m] += 1
            elif aggregation == "max":
                primary = secondary
            else:
                primary = best.sum(0)
            order = sorted(range(n_spans), key=lambda i: (-primary[i].item(), -secondary[i].item(), i))
            if 0 < k < n_spans:
                last, first_out = order[k - 1], order[k]
                if primary[last] == primary[first_out] and aggregation == "vote":
                    _require_gap(secondary[last].item(), secondary[first_out].item(), tol)
                else:
                    scale = len(rows) if aggregation == "sum" else 1
                    _require_gap(primary[last].item(), primary[first_out].item(), tol * scale)
            out[b, sel] = torch.tensor(sorted(order[:k]), dtype=torch.long)
    return out


# ---- well-formed selections -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, aggregation", POLICY_AGGREGATIONS)
@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("hq, hkv", HEADS)
@pytest.mark.parametrize("dim", [64, 16])
def test_selection_is_sorted_unique_in_range_and_at_most_top_k(name, aggregation, per_kv_head, hq, hkv, dim):
    policy = _policy(name, aggregation)
    queries, keys = _inputs(hq, hkv, dim, seed=hq * 100 + dim)
    n_spans, top_k = keys.shape[2], 4
    selected = policy.select(queries, _summaries(policy, keys), top_k, per_kv_head)
    k = 0 if name == "streaming" else min(top_k, n_spans)
    assert selected.dtype == torch.int64
    assert selected.shape == (BATCH, hkv if per_kv_head else 1, k)
    if k:
        assert (selected[..., 1:] > selected[..., :-1]).all()  # ascending and unique
        assert selected.min() >= 0 and selected.max() < n_spans


@pytest.mark.parametrize("name", policy_names())
@pytest.mark.parametrize("top_k", [0, 1, 9, 10, 25])
def test_selection_size_is_min_of_top_k_and_spans(name, top_k):
    policy = _policy(name)
    queries, keys = _inputs(9, 3, 16)
    selected = policy.select(queries, _summaries(policy, keys), top_k, per_kv_head=True)
    k = 0 if name == "streaming" else min(top_k, 10)
    assert selected.shape == (BATCH, 3, k)
    if k == 10:
        assert (selected == torch.arange(10)).all()


@pytest.mark.parametrize("name", policy_names())
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_no_spans_selects_nothing(name, per_kv_head):
    policy = _policy(name)
    queries, keys = _inputs(8, 2, 16, n_spans=0)
    selected = policy.select(queries, _summaries(policy, keys), 4, per_kv_head)
    assert selected.dtype == torch.int64 and selected.shape == (BATCH, 2 if per_kv_head else 1, 0)


@pytest.mark.parametrize("name", SCORED)
def test_query_heads_must_group_over_kv_heads(name):
    policy = _policy(name)
    queries, _ = _inputs(9, 3, 16)
    _, keys = _inputs(8, 2, 16)
    with pytest.raises(ValueError, match="9 query heads cannot be grouped over 2 KV heads"):
        policy.select(queries, _summaries(policy, keys), 4, per_kv_head=False)


@pytest.mark.parametrize("name, aggregation", POLICY_AGGREGATIONS)
def test_batch_selection_equals_per_sequence_selection(name, aggregation):
    policy = _policy(name, aggregation)
    queries, keys = _inputs(9, 3, 16, seed=1)
    summaries = _summaries(policy, keys)
    together = policy.select(queries, summaries, 4, per_kv_head=True)
    for b in range(BATCH):
        assert torch.equal(together[b : b + 1], policy.select(queries[b : b + 1], summaries[b : b + 1], 4, True))


@pytest.mark.parametrize("name, aggregation", POLICY_AGGREGATIONS)
def test_query_block_does_not_change_the_selection(name, aggregation):
    queries, keys = _inputs(8, 2, 16, n_queries=7, seed=2)
    whole, blocked = _policy(name, aggregation), _policy(name, aggregation, query_block=2)
    summaries = _summaries(whole, keys)
    for per_kv_head in (False, True):
        assert torch.equal(whole.select(queries, summaries, 4, per_kv_head), blocked.select(queries, summaries, 4, per_kv_head))


@pytest.mark.parametrize("name", SCORED)
def test_non_contiguous_queries_give_the_same_selection(name):
    """Attention code hands over queries as q_proj(x).view(B, q, H, D).transpose(1, 2)."""
    policy = _policy(name)
    queries, keys = _inputs(9, 3, 16, seed=3)
    strided = queries.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    summaries = _summaries(policy, keys)
    for per_kv_head in (False, True):
        assert torch.equal(policy.select(strided, summaries, 4, per_kv_head), policy.select(queries, summaries, 4, per_kv_head))


@pytest.mark.parametrize("name", policy_names())
def test_half_precision_inputs_select_like_their_fp32_values(name):
    policy = _policy(name)
    queries, keys = _inputs(8, 2, 16, seed=4)
    queries, summaries = queries.bfloat16(), _summaries(policy, keys.bfloat16())
    assert summaries.dtype == torch.bfloat16
    expected = policy.select(queries.float(), summaries.float(), 4, True)
    assert torch.equal(policy.select(queries, summaries, 4, True), expected)


@pytest.mark.parametrize("name, aggregation", [(n, a) for n, a in POLICY_AGGREGATIONS if a])
def test_shared_and_per_head_selection_agree_with_one_kv_head(name, aggregation):
    policy = _policy(name, aggregation)
    queries, keys = _inputs(4, 1, 16, seed=5)
    summaries = _summaries(policy, keys)
    assert torch.equal(policy.select(queries, summaries, 3, False), policy.select(queries, summaries, 3, True))


def test_streaming_scores_nothing():
    policy = _policy("streaming")
    queries, keys = _inputs(4, 4, 16)
    with pytest.raises(RuntimeError, match="scores nothing"):
        policy.candidate_scores(queries.view(BATCH, 4, 1, -1, 16), _summaries(policy, keys))


# ---- summaries ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", policy_names())
@pytest.mark.parametrize("span", [8, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summary_shape_and_dtype(name, span, dtype):
    policy = _policy(name)
    keys = torch.randn(5, 3, span, 16, generator=torch.Generator().manual_seed(span)).to(dtype)  # [N, Hkv, S, D]
    summaries = policy.summarise(keys)
    assert summaries.shape == (5, 3, policy.summary_size(span), 16)
    assert summaries.dtype == dtype


def test_summary_sizes():
    assert [_policy(n).summary_size(32) for n in ("reattention", "mean", "quest", "infllm", "streaming")] == [32, 1, 2, 4, 0]
    assert _policy("infllm", representatives=6).summary_size(4) == 4


def test_quest_summary_is_the_channelwise_min_and_max():
    keys = torch.randn(6, 2, 8, 16, generator=torch.Generator().manual_seed(0))
    lo, hi = _policy("quest").summarise(keys).unbind(2)  # each [N, Hkv, D]
    assert (lo[:, :, None] <= keys).all() and (keys <= hi[:, :, None]).all()
    assert torch.equal(lo, keys.amin(2)) and torch.equal(hi, keys.amax(2))  # attained: the tightest box


def test_mean_summary_is_the_mean_key():
    keys = torch.randn(6, 2, 8, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_policy("mean").summarise(keys)[:, :, 0], keys.double().mean(2).float())


def test_reattention_summary_is_a_copy_of_the_keys():
    keys = torch.randn(6, 2, 8, 16, generator=torch.Generator().manual_seed(0))
    summaries = _policy("reattention").summarise(keys)
    assert torch.equal(summaries, keys) and summaries.data_ptr() != keys.data_ptr()


@pytest.mark.parametrize("representatives, span", [(4, 8), (1, 8), (4, 3)])
def test_infllm_representatives_are_distinct_keys_of_the_span(representatives, span):
    keys = torch.randn(6, 2, span, 16, generator=torch.Generator().manual_seed(0))  # [N, Hkv, S, D]
    reps = _policy("infllm", representatives=representatives).summarise(keys)  # [N, Hkv, c, D]
    matches = (reps[:, :, :, None] == keys[:, :, None]).all(-1)  # [N, Hkv, c, S]
    assert (matches.sum(-1) == 1).all()  # every representative is exactly one key of its own span and head
    picked = matches.int().argmax(-1)  # [N, Hkv, c]
    c = min(representatives, span)
    assert all(len(set(row)) == c for row in picked.reshape(-1, c).tolist())
    # the keys most aligned with the span's mean key, brute force
    centre = keys.double().mean(2)  # [N, Hkv, D]
    for n in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            closeness = [float(keys[n, h, s].double() @ centre[n, h]) for s in range(span)]
            expected = sorted(sorted(range(span), key=lambda s: -closeness[s])[:c])
            assert sorted(picked[n, h].tolist()) == expected


# ---- brute-force references -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("hq, hkv", HEADS)
@pytest.mark.parametrize("dim", [64, 16])
def test_reattention_reproduces_the_paper_vote(per_kv_head, hq, hkv, dim):
    """Each (query token, query head) votes for the spans holding its top-4 middle tokens by raw pre-RoPE dot
    product with its own KV head; most votes win, ties to the best score, then to the lower span id."""
    policy = _policy("reattention")
    queries, keys = _inputs(hq, hkv, dim, seed=7 * hq + dim)
    expected = _reference_select(_reference_scores("reattention", queries, keys), hq // hkv, 4, per_kv_head, "vote")
    assert torch.equal(policy.select(queries, _summaries(policy, keys), 4, per_kv_head), expected)


@pytest.mark.parametrize("name", SCORED)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("hq, hkv", HEADS)
def test_selection_matches_brute_force_reference(name, aggregation, per_kv_head, hq, hkv):
    policy = _policy(name, aggregation)
    queries, keys = _inputs(hq, hkv, 16, seed=11 * hq + hkv)
    expected = _reference_select(_reference_scores(name, queries, keys), hq // hkv, 4, per_kv_head, aggregation)
    assert torch.equal(policy.select(queries, _summaries(policy, keys), 4, per_kv_head), expected)


@pytest.mark.parametrize("hq, hkv", HEADS)
def test_quest_scores_are_the_brute_force_upper_bound(hq, hkv):
    policy = _policy("quest")
    queries, keys = _inputs(hq, hkv, 16, seed=13)
    reference = _reference_scores("quest", queries, keys)[..., 0]  # [B, Hq, q, n]
    grouped = queries.view(BATCH, hkv, hq // hkv, -1, 16)  # [B, Hkv, g, q, D]
    scores = policy.candidate_scores(grouped, _summaries(policy, keys).float())  # [B, Hkv, g, q, n, 1]
    assert scores.shape == (*grouped.shape[:4], keys.shape[2], 1)
    torch.testing.assert_close(scores.reshape(reference.shape).double(), reference, rtol=1e-5, atol=1e-4)
    # the bound property: no key of a span has a larger dot product with the query than the span's bound
    dots = torch.einsum("bhtd,bhnsd->bhtns", queries.double(), _paired(queries, keys.double()))
    assert (dots <= reference[..., None] + 1e-9).all()
    assert (scores.reshape(reference.shape)[..., None] >= dots - 1e-4).all()


# ---- GQA pairing: query head h reads KV head h // group -------------------------------------------------------------
_PLANT = 100.0
_PAIRING = [(9, 3, 5), (8, 2, 1)]  # (query heads, KV heads, planted query head): h // group != h mod Hkv


def _planted(hq, hkv, head, planted_kv_head, span_id, n_spans=16, seed=0):
    """Random inputs in which channel 0 is zero except in query `head` and in span `span_id` of `planted_kv_head`,
    whose keys are all A*e0: only (head, planted_kv_head) sees the huge score A^2. Elsewhere span_id's keys are 0,
    so no other (query head, KV head) pair has any reason to pick it."""
    queries, keys = _inputs(hq, hkv, 16, n_spans=n_spans, n_queries=8, seed=seed)
    queries[..., 0] = 0
    keys[..., 0] = 0
    queries[:, head, :, 0] = _PLANT
    keys[:, :, span_id] = 0
    keys[:, planted_kv_head, span_id, :, 0] = _PLANT
    return queries, keys


_PAIRING_POLICIES = [(n, a) for n in ("reattention", "mean", "quest", "infllm") for a in ("max", "sum")] + [
    ("reattention", "vote")
]


@pytest.mark.parametrize("name, aggregation", _PAIRING_POLICIES)
@pytest.mark.parametrize("hq, hkv, head", _PAIRING)
def test_query_head_reads_kv_head_h_div_group(name, aggregation, hq, hkv, head):
    policy, own, span_id = _policy(name, aggregation), head // (hq // hkv), 11
    queries, keys = _planted(hq, hkv, head, own, span_id)
    summaries = _summaries(policy, keys)
    per_head = policy.select(queries, summaries, 2, per_kv_head=True)
    assert (per_head[:, own] == span_id).any(-1).all(), per_head
    assert (policy.select(queries, summaries, 2, per_kv_head=False) == span_id).any(-1).all()


@pytest.mark.parametrize("name, aggregation", _PAIRING_POLICIES)
@pytest.mark.parametrize("hq, hkv, head", _PAIRING)
def test_query_head_does_not_read_kv_head_h_mod_hkv(name, aggregation, hq, hkv, head):
    """The authors' decode bug paired query head h with KV head h mod Hkv; a span planted there must not win."""
    policy, wrong, span_id = _policy(name, aggregation), head % hkv, 11
    assert wrong != head // (hq // hkv)
    queries, keys = _planted(hq, hkv, head, wrong, span_id)
    summaries = _summaries(policy, keys)
    assert not (policy.select(queries, summaries, 2, per_kv_head=True) == span_id).any()
    assert not (policy.select(queries, summaries, 2, per_kv_head=False) == span_id).any()


@pytest.mark.parametrize("name, aggregation", [(n, a) for n, a in POLICY_AGGREGATIONS if a])
@pytest.mark.parametrize("hq, hkv", [(9, 3), (8, 2)])
def test_kv_head_selection_depends_only_on_its_own_query_heads(name, aggregation, hq, hkv):
    policy, group = _policy(name, aggregation), hq // hkv
    queries, keys = _inputs(hq, hkv, 16, seed=17)
    summaries = _summaries(policy, keys)
    before = policy.select(queries, summaries, 4, per_kv_head=True)
    for kv in range(hkv):
        others = [h for h in range(hq) if h // group != kv]
        changed = queries.clone()
        changed[:, others] = torch.randn(changed[:, others].shape, generator=torch.Generator().manual_seed(kv)) * 10
        assert torch.equal(policy.select(changed, summaries, 4, per_kv_head=True)[:, kv], before[:, kv])


# ---- ranking ties ---------------------------------------------------------------------------------------------------
def test_rank_orders_by_primary_then_secondary_then_id():
    primary = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0, 2.0])
    secondary = torch.tensor([5.0, 1.0, 3.0, 3.0, 9.0, 3.0])
    assert rank_spans(primary, secondary).tolist() == [2, 3, 5, 1, 0, 4]


def test_rank_all_equal_keeps_id_order():
    assert rank_spans(torch.zeros(7), torch.full((7,), float("-inf"))).tolist() == list(range(7))


def test_rank_is_per_row():
    primary = torch.tensor([[[0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0]]])  # [B=2, H=1, n=3]
    secondary = torch.tensor([[[9.0, 2.0, 4.0]], [[2.0, 2.0, 9.0]]])
    assert rank_spans(primary, secondary).tolist() == [[[2, 1, 0]], [[0, 1, 2]]]


def test_best_spans_are_the_first_k_of_the_rank_order_in_id_order():
    primary = torch.tensor([[[1.0, 2.0, 2.0, 2.0, 0.0, 2.0]]])  # [B=1, H=1, n=6]
    secondary = torch.tensor([[[5.0, 1.0, 3.0, 3.0, 9.0, 3.0]]])
    assert best_spans(primary, secondary, 3).tolist() == [[[2, 3, 5]]]
    assert best_spans(primary, secondary, 9).tolist() == [[[0, 1, 2, 3, 4, 5]]]


def _runs_best_last(ranked: list[int]) -> list[int]:
    """The documented rule, in plain Python: ranked ids (best first) -> runs of consecutive ids, each in text order,
    ordered by the best rank among their ids, worst first."""
    runs: list[list[int]] = []
    for span in sorted(ranked):
        if runs and span == runs[-1][-1] + 1:
            runs[-1].append(span)
        else:
            runs.append([span])
    best = {tuple(run): min(ranked.index(span) for span in run) for run in runs}
    return [span for run in sorted(runs, key=lambda run: -best[tuple(run)]) for span in run]


@pytest.mark.parametrize("ranked, expected", [
    ([5, 9, 1], [1, 9, 5]),  # no runs: the best last, the worst first
    ([5, 6, 4, 20, 1], [1, 20, 4, 5, 6]),  # the best's run in text order, last
    ([7, 2, 3, 8, 30], [30, 2, 3, 7, 8]),  # 7-8 holds the best (rank 0), 2-3 the next (rank 1)
    ([0], [0]),
])
def test_best_run_last_keeps_runs_in_text_order_and_puts_the_best_run_last(ranked, expected):
    assert _runs_best_last(ranked) == expected
    assert best_run_last(torch.tensor([ranked])).tolist() == [expected]


def test_best_run_last_matches_its_reference_on_random_rankings():
    gen = torch.Generator().manual_seed(0)
    ranked = torch.stack([torch.randperm(40, generator=gen)[:12] for _ in range(30)]).view(3, 10, 12)
    got = best_run_last(ranked)
    for row, want in zip(got.flatten(0, 1).tolist(), ranked.flatten(0, 1).tolist()):
        assert row == _runs_best_last(want)


def test_best_spans_lays_out_the_same_spans_best_last():
    primary = torch.tensor([[[0.5, 0.1, 3.0, 2.0, 0.0, 1.0]]])
    text = best_spans(primary, primary, 4)
    best_last = best_spans(primary, primary, 4, layout="best_last")
    assert text.tolist() == [[[0, 2, 3, 5]]]
    assert best_last.tolist() == [[[0, 5, 2, 3]]]  # 2-3 (ranks 0 and 1) last, then 5 (rank 2), 0 (rank 3) first


def test_best_spans_keep_first_brings_span_0_in_ranked_best_in_place_of_the_last_pick():
    primary = torch.tensor([[[0.0, 0.5, 3.0, 2.0, 0.1, 1.0]], [[4.0, 0.0, 3.0, 2.0, 0.1, 1.0]]])  # [B=2, H=1, n=6]
    assert best_spans(primary, primary, 3, layout="best_last").tolist() == [[[5, 2, 3]], [[2, 3, 0]]]
    kept = best_spans(primary, primary, 3, layout="best_last", keep_first=True)
    # row 0: span 0 comes in ranked best (laid out last) and 5, the last pick, goes; row 1 chose it already: unchanged
    assert kept.tolist() == [[[2, 3, 0]], [[2, 3, 0]]]
    assert best_spans(primary, primary, 3, keep_first=True).tolist() == [[[0, 2, 3]], [[0, 2, 3]]]
    assert best_spans(primary, primary, 0, keep_first=True).shape == (2, 1, 0)


def test_best_spans_merge_heads_by_summed_or_maxed_primary():
    primary = torch.tensor([[[3.0, 0.0, 2.0], [0.0, 2.0, 2.0]]])  # [B=1, H=2, n=3]: sums 3, 2, 4; maxima 3, 2, 2
    secondary = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 5.0, 1.0]]])  # maxima 0, 5, 1
    assert best_spans(primary, secondary, 1, "sum").tolist() == [[[2]]]
    assert best_spans(primary, secondary, 2, "max").tolist() == [[[0, 1]]]
    assert best_spans(primary, secondary, 1).tolist() == [[[0], [1]]]


def test_vote_ties_go_to_the_best_score_then_the_lower_span():
    """Two query heads each vote once (votes=1, one mean key per span): a one-vote tie goes to the higher score."""
    policy = _policy("mean", "vote", votes=1)
    summaries = torch.eye(4)[None, None, :, None, :]  # [B=1, Hkv=1, n=4, c=1, D=4]
    queries = torch.tensor([[[[0.0, 2.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 3.0]]]])  # [B=1, Hq=2, q=1, D=4]
    # spans 1 and 3 have a vote each; span 3 has the better score
    assert policy.select(queries, summaries, 1, per_kv_head=False).tolist() == [[[3]]]
    equal = torch.tensor([[[[0.0, 2.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 2.0]]]])
    assert policy.select(equal, summaries, 1, per_kv_head=False).tolist() == [[[1]]]  # equal score: lower id


# ---- registry -------------------------------------------------------------------------------------------------------
@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so a test's own policies do not leak into other tests."""
    monkeypatch.setattr(policies, "_REGISTRY", dict(policies._REGISTRY))
    return policies._REGISTRY


@dataclass
class _LastKeyPolicy(Policy):
    """A span is summarised by its last key, scaled."""

    aggregation: str = "max"
    scale: float = 1.0

    name = "test-last-key"

    def summary_size(self, span_size: int) -> int:
        return 1

    def summarise(self, keys: torch.Tensor) -> torch.Tensor:
        return keys[:, :, -1:].clone()

    def candidate_scores(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        return self.scale * dot_scores(queries, summaries)


def test_registered_policy_is_built_by_name_with_options(registry):
    assert register_policy(_LastKeyPolicy) is _LastKeyPolicy
    assert "test-last-key" in policy_names()
    policy = build_policy("test-last-key", {"scale": 2.0, "aggregation": "sum"})
    assert isinstance(policy, _LastKeyPolicy) and (policy.scale, policy.aggregation) == (2.0, "sum")
    queries, keys = _inputs(9, 3, 16)
    selected = policy.select(queries, _summaries(policy, keys), 4, per_kv_head=True)
    assert selected.shape == (BATCH, 3, 4) and (selected[..., 1:] > selected[..., :-1]).all()


def test_registered_policy_is_usable_from_a_config(registry):
    from kvtier import ReAttentionConfig

    register_policy(_LastKeyPolicy)
    config = ReAttentionConfig(policy="test-last-key", policy_options={"scale": 0.5}).resolve(8192)
    assert config.policy == "test-last-key"
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['bias'\]"):
        ReAttentionConfig(policy="test-last-key", policy_options={"bias": 0.5}).resolve(8192)


def test_register_policy_works_as_a_decorator(registry):
    @register_policy
    @dataclass
    class Decorated(_LastKeyPolicy):
        name = "test-decorated"

    assert isinstance(build_policy("test-decorated"), Decorated)


def test_registering_the_same_class_twice_is_harmless(registry):
    register_policy(_LastKeyPolicy)
    register_policy(_LastKeyPolicy)
    assert policy_names().count("test-last-key") == 1


def test_a_taken_name_cannot_be_registered_again(registry):
    @dataclass
    class Impostor(_LastKeyPolicy):
        name = "quest"

    with pytest.raises(ValueError, match=r"a policy named 'quest' is already registered \(QuestPolicy\)"):
        register_policy(Impostor)
    assert type(build_policy("quest")).__name__ == "QuestPolicy"


def test_register_policy_needs_a_name(registry):
    @dataclass
    class Nameless(_LastKeyPolicy):
        name = ""

    with pytest.raises(ValueError, match="needs a class attribute `name`"):
        register_policy(Nameless)


@pytest.mark.parametrize("bad", [object, int, "quest"])
def test_register_policy_needs_a_policy_class(registry, bad):
    with pytest.raises(TypeError, match="expects a @dataclass subclass"):
        register_policy(bad)


def test_unknown_policy_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; choose one of \['consensus', 'infllm', 'mean', 'quest', 'reattention', 'streaming'\]"):
        build_policy("nope")


def test_unknown_policy_option_lists_the_parameters():
    with pytest.raises(ValueError, match=r"policy 'mean' has no parameter\(s\) \['representatives'\].*'aggregation'"):
        build_policy("mean", {"representatives": 2})


@pytest.mark.parametrize(
    "name, options, problem",
    [
        ("quest", {"aggregation": "avg"}, "aggregation must be one of"),
        ("reattention", {"votes": 0}, "votes must be a positive integer"),
        ("reattention", {"votes": True}, "votes must be a positive integer"),
        ("mean", {"query_block": 0}, "query_block must be a positive integer"),
        ("infllm", {"representatives": 0}, "representatives must be a positive integer"),
        ("infllm", {"representatives": 2.0}, "representatives must be a positive integer"),
    ],
)
def test_bad_policy_parameters_raise(name, options, problem):
    with pytest.raises(ValueError, match=problem):
        build_policy(name, options)


def test_built_policies_are_independent_instances():
    assert build_policy("quest") is not build_policy("quest")
    assert build_policy("quest", {"aggregation": "max"}).aggregation == "max"
    assert build_policy("quest").aggregation == "vote"
