"""The selection diagnosis (kvtier.tools.diagnose, kvtier.tools.diagnosis): which spans hold a needle, what the
answer's queries select and where the needle ranks, and the oracle that forces the needle's spans into the scope."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier import ReAttentionCache
from kvtier.config import ReAttentionConfig
from kvtier.hf import cache_keyword
from kvtier.policies import build_policy, policy_names
from kvtier.tools.diagnose import (
    NeedleSpans, _replace_lowest, force_spans, observe_selection, policy_order, sealed_spans, spans_of,
)
from kvtier.tools.diagnosis import diagnose, format_diagnosis, plot_diagnosis, probe_of
from kvtier.tools.corpus import TokenizedCorpus
from kvtier.tools.haystack import build_sample
from kvtier.tools.model import ByteTokenizer, random_llama
from kvtier.tools.niah import answer
from kvtier.tools.tasks import NEEDLE as NEEDLE_TEXT, build_task_sample
from tests.conftest import random_ids, tiny_model

SMALL = dict(global_size=4, local_size=64, span_size=8, top_k=2, chunk_size=16, kernels="reference", seal_group=1)
CONFIG = ReAttentionConfig(**SMALL, policy="quest")  # ranks per layer: consensus votes across layers
PROMPT = 240  # 4 global tokens, then (240 - 4 - 64) / 8 = 21.5 -> 22 sealed spans, and the rest in the window
NEEDLE = [(50, 70)]  # tokens 50..69: spans (50-4)//8 = 5 to (69-4)//8 = 8
EVERY_SPAN = [(4, 10**6)]  # a needle over every middle token: the observer ranks every sealed span


@pytest.fixture(scope="module")
def model(one_torch_thread):
    return tiny_model("llama")


def _answer(model, cache, new_tokens: int = 4):
    """Greedy answer to a random PROMPT-token prompt, as the niah runs answer (chunked prefill, then generate)."""
    return answer(model, random_ids(PROMPT).tolist()[0], cache, new_tokens, prefill_chunk=64)


def test_spans_of_maps_token_ranges_to_spans_in_token_order():
    assert spans_of([(50, 70)], CONFIG).ids == (5, 6, 7, 8)
    assert spans_of([(12, 20), (100, 101)], CONFIG).ids == (1, 12)
    inside_global = spans_of([(0, 6)], CONFIG)
    assert inside_global.ids == (0,) and inside_global.by_construction == ((0, 4),)
    # at 240 tokens 22 spans are sealed: tokens from 4 + 22 * 8 = 180 on are still in the local window
    assert sealed_spans(PROMPT, CONFIG) == 22
    by_four = CONFIG.replace(seal_group=4)  # sealed four at a time: 20 spans up to 252 tokens, 24 from 253
    assert [sealed_spans(tokens, by_four) for tokens in (PROMPT, 252, 253)] == [20, 20, 24]
    late = spans_of([(170, 190)], CONFIG, tokens=PROMPT)
    assert late.ids == (20, 21) and late.by_construction == ((180, 190),)
    with pytest.raises(ValueError, match="beyond the 240 tokens"):
        spans_of([(230, 250)], CONFIG, tokens=PROMPT)


@pytest.mark.parametrize("seal_group", [1, 4])
def test_span_j_holds_the_pre_rope_keys_of_the_tokens_spans_of_maps_to_it(model, seal_group):
    """The keys sealed in span j of every layer are the k_proj outputs (pre-RoPE keys; llama has no key norm) of the
    tokens spans_of maps to span j."""
    cache = ReAttentionCache(model, CONFIG.replace(seal_group=seal_group))
    keys = {}  # layer -> [B, Hkv, T, D]

    def keep(index):
        def hook(module, args, out):
            keys[index] = out.view(1, -1, 2, 16).transpose(1, 2)

        return hook

    hooks = [layer.self_attn.k_proj.register_forward_hook(keep(index))
             for index, layer in enumerate(model.model.layers)]
    try:
        with torch.inference_mode():
            model(input_ids=random_ids(PROMPT), **{cache_keyword(model): cache})
    finally:
        for hook in hooks:
            hook.remove()
    count = sealed_spans(PROMPT, cache.config)
    for index, layer in enumerate(cache.layers):
        assert len(layer.table) == count
        sealed = cache.placement.read_spans(layer.table.uids_host.view()[0].numpy())[:, 0]  # [n, Hkv, S, D]
        for span in range(count):
            tokens = [token for token in range(PROMPT)
                      if spans_of([(token, token + 1)], cache.config, tokens=PROMPT).ids == (span,)]
            assert tokens == list(range(4 + 8 * span, 12 + 8 * span))
            assert torch.equal(sealed[span], keys[index][0, :, tokens])
    assert spans_of(NEEDLE, cache.config, tokens=PROMPT) == NeedleSpans((5, 6, 7, 8), ())


def test_observe_selection_records_one_entry_per_layer_per_answer_query(model):
    cache = ReAttentionCache(model, CONFIG)
    returned = {index: [] for index in range(len(cache.layers))}  # what select returns, seen beneath the observer
    for index, layer in enumerate(cache.layers):
        layer.select = _recording(layer.select, returned[index])
    recorders = [vars(layer)["select"] for layer in cache.layers]
    with observe_selection(cache, [NEEDLE], from_token=PROMPT - 1) as observation:
        queries = len(_answer(model, cache).tokens)  # the last prompt token, then every new token but the last
    assert [vars(layer)["select"] for layer in cache.layers] == recorders  # the observer put back what it wrapped
    assert len(observation.records) == len(cache.layers) * queries
    for index in returned:
        records = observation.of_layer(index)
        assert [record.query for record in records] == list(range(queries))
        assert [record.tokens for record in records] == list(range(PROMPT, PROMPT + queries))
        for record, ids in zip(records, returned[index][-queries:]):
            assert record.selected == ids[:, :1].tolist() and record.needle_spans == [[5, 6, 7, 8]]
            assert record.needle_selected == [[span in record.selected[0][0] for span in (5, 6, 7, 8)]]
            assert record.in_scope == [all(record.needle_selected[0])]
            assert record.sealed == sealed_spans(record.tokens, CONFIG)


def test_the_hooks_leave_the_forwards_before_the_answer_batched(model):
    baseline = _answer(model, ReAttentionCache(model, CONFIG)).tokens
    cache = ReAttentionCache(model, CONFIG)
    plans = []  # what the layers' own plan_forward returned, seen beneath the hooks
    for layer in cache.layers:
        layer.plan_forward = _recording(layer.plan_forward, plans)
    with force_spans(cache, [[5]], from_token=PROMPT - 1), observe_selection(cache, [NEEDLE], from_token=PROMPT - 1):
        tokens = _answer(model, cache).tokens
    assert any(plan is not None for plan in plans)  # the prefill's forwards were planned at once
    assert all("plan_forward" in vars(layer) for layer in cache.layers)  # the recorder put back, the hooks' removed
    assert tokens != [] and len(tokens) == len(baseline)


def _recording(select, into: list):
    def recording(queries):
        into.append(select(queries))
        return into[-1]

    return recording


def test_ranks_agree_with_the_selection(model):
    cache = ReAttentionCache(model, CONFIG)
    with observe_selection(cache, [EVERY_SPAN]) as observation:
        _answer(model, cache)
    assert any(record.selected[0][0] for record in observation.records)
    for record in observation.records:
        spans, ranks, selected = record.needle_spans[0], record.ranks[0][0], record.selected[0][0]
        assert spans == list(range(record.sealed))
        assert sorted(rank for span, rank in zip(spans, ranks) if span in selected) == list(range(len(selected)))
        assert record.in_scope[0] == (len(selected) == len(spans))


@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("name", [name for name in policy_names() if name != "streaming"])
def test_policy_order_begins_with_what_the_policy_selects(name, per_kv_head):
    policy = build_policy(name)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 6, 5, 16, generator=generator)  # [B, Hq, c, D]
    summaries = policy.summarise(torch.randn(2 * 30, 2, 8, 16, generator=generator))  # [N, Hkv, c, D]
    summaries = summaries.view(2, 30, *summaries.shape[1:]).transpose(1, 2)  # [B, Hkv, n, c, D]
    order = policy_order(policy, queries, summaries, per_kv_head)
    assert order.shape == (2, 2 if per_kv_head else 1, 30)
    assert torch.equal(order.sort(-1).values, torch.arange(30).expand_as(order))
    assert torch.equal(order[..., :4].sort(-1).values, policy.select(queries, summaries, 4, per_kv_head))


def test_force_spans_puts_the_spans_in_every_selection_in_place_of_the_lowest_ranked_picks(model):
    cache = ReAttentionCache(model, CONFIG)
    with observe_selection(cache, [EVERY_SPAN]) as plain, force_spans(cache, [[7]]), \
            observe_selection(cache, [EVERY_SPAN]) as forced:
        _answer(model, cache)
    assert len(plain.records) == len(forced.records) > 0
    touched = 0
    for before, after in zip(plain.records, forced.records):  # the same calls, seen under and over the oracle
        picks, chosen = before.selected[0][0], after.selected[0][0]
        if after.sealed <= 7:  # span 7 is not sealed yet: its tokens are in the local window
            assert chosen == picks
            continue
        rank = dict(zip(before.needle_spans[0], before.ranks[0][0]))
        best_other = sorted((span for span in picks if span != 7), key=rank.__getitem__)[: CONFIG.top_k - 1]
        assert chosen == sorted(best_other + [7])
        touched += picks != chosen
    assert touched > 0


def test_force_spans_keeps_span_0_where_the_policy_always_keeps_it(model):
    """consensus' keep_first_span: span 0 stays in every selection under the oracle, ranked after the forced span, so
    the room left for the policy's picks is one span smaller; without the option the oracle may drop it."""
    config = CONFIG.replace(policy="consensus", top_k=3)
    cache = ReAttentionCache(model, config)
    with force_spans(cache, [[7]]), observe_selection(cache, [EVERY_SPAN]) as forced:
        _answer(model, cache)
    holding_7 = [record.selected[0][0] for record in forced.records if record.sealed > 7]
    assert holding_7 and all(0 in chosen and 7 in chosen for chosen in holding_7)
    cache = ReAttentionCache(model, config)
    with force_spans(cache, [[5, 6, 7]]), observe_selection(cache, [EVERY_SPAN]) as full:
        _answer(model, cache)  # as many forced spans as top_k: no room left for span 0
    assert all(record.selected[0][0] == [5, 6, 7] for record in full.records if record.sealed > 7)


def test_force_spans_leaves_the_library_unchanged_after_exit(model):
    baseline = _answer(model, ReAttentionCache(model, CONFIG), new_tokens=6).tokens
    cache = ReAttentionCache(model, CONFIG)
    with force_spans(cache, [[2, 3]]):
        _answer(model, cache, new_tokens=6)
    assert all("select" not in vars(layer) for layer in cache.layers)
    assert _answer(model, ReAttentionCache(model, CONFIG), new_tokens=6).tokens == baseline


def test_force_spans_refuses_more_spans_than_top_k(model):
    with pytest.raises(ValueError, match="top_k = 2"):
        with force_spans(ReAttentionCache(model, CONFIG), [[1, 2, 3]]):
            pass


def test_probe_of_takes_the_asked_needles_of_a_passkey_or_a_ruler_sample():
    tokenizer = ByteTokenizer()
    for distractors in (0, 2):
        sample = build_sample(tokenizer, 600, 0.5, "12345", distractors=distractors)
        probe = probe_of(sample, length=512)
        (start, end), = probe.needles
        needle = bytes(sample.ids[start:end]).decode()
        assert start == sample.needle_start and needle.startswith(" The pass key") and "12345" in needle
        assert probe.answers == ("12345",) and probe.length == 512 and probe.depth == 0.5
    corpus = TokenizedCorpus(tokenizer, ["The river runs north.", "A bridge crosses it at the old town."])
    sample = build_task_sample(corpus, 900, 0.3, "multikey", needles=3)
    probe = probe_of(sample)
    (start, end), = probe.needles  # the asked needle only, not the two distractors
    assert probe.answers == (sample.asked[0].value,) and (start, end) == sample.needle_spans[0]
    needle = NEEDLE_TEXT.format(key=sample.asked[0].key, value=probe.answers[0])
    assert bytes(sample.ids[start:end]).decode() == " " + needle


def test_diagnose_reports_recall_rank_and_the_oracle_per_prompt_and_layer(one_torch_thread, tmp_path):
    model, tokenizer = random_llama("tiny", "cpu", torch.float32), ByteTokenizer()
    probes = [probe_of(build_sample(tokenizer, 400, depth, "12345"), length=400) for depth in (0.2, 0.6)]
    config = {**SMALL, "span_size": 16, "top_k": 6}  # room for the 59 bytes of a needle: at most 5 spans of 16
    report = diagnose(model, tokenizer, probes, config, max_new_tokens=3, prefill_chunk=64)
    probes_ids = {probe.depth: probe.ids for probe in probes}
    assert report["config"]["top_k"] == 6 and len(report["prompts"]) == 2
    assert report["config"]["decode_graphs"] == "off"  # no static step hides an answer query from the hooks
    for prompt in report["prompts"]:
        assert len(prompt["layers"]) == 2 and prompt["needle_spans"]
        for layer in prompt["layers"]:
            assert len(layer["in_scope"]) == len(layer["ranks"]) > 0
            assert np.mean(layer["in_scope"]) <= layer["recall"] <= 1  # a part of the needle may be selected
            assert (layer["recall"] == 1) == all(layer["in_scope"])
        assert prompt["oracle"]["recall"] == 1.0  # the oracle's selections hold the needle at every query
        assert isinstance(prompt["plain"]["hit"], bool) and "answer" in prompt["oracle"]
        chosen = prompt["last_layer_spans"]  # the last layer's choice at the first answer query, with its text
        assert 0 < len(chosen) <= 6 and all(len(span["text"]) == 16 for span in chosen)  # 16 byte tokens per span
        span = chosen[0]["span"]
        assert chosen[0]["text"] == tokenizer.decode(list(probes_ids[prompt["depth"]][4 + 16 * span:][:16]))
    by_length, overall = report["summary"]
    assert by_length["length"] == 400 and overall["length"] is None and overall["prompts"] == 2
    assert 0 <= overall["all_selected"] <= overall["recall"] <= 1
    assert "400" in format_diagnosis(report)
    assert plot_diagnosis(report, tmp_path / "diagnosis.png").stat().st_size > 0


@pytest.mark.parametrize("layout, expected", [("text", [2, 7, 9]), ("best_last", [2, 9, 7])])
def test_the_oracle_lays_its_selection_out_as_the_policy_does(layout, expected):
    """The forced span ranks first: best-last puts it next to the local window; the room left keeps the best picks."""
    order = torch.tensor([[[9, 2, 5, 0, 1, 3, 4, 6, 7, 8, 10, 11]]])  # best first
    picks = torch.tensor([[[2, 5, 9]]])
    assert _replace_lowest(picks, order, [[7]], layout).tolist() == [[expected]]
