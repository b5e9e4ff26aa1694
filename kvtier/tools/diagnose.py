"""Observe and force a ReAttentionCache's span selections, to tell a needle the policy did not select from a needle
the model misreads once selected: which spans hold a needle's tokens, what each answer query selected and where the
needle's spans ranked under the policy, and an oracle that puts them in the scope.

Both hooks wrap `select` on the cache's layer instances (an instance attribute, removed on exit) and have the layers
take a forward reaching `from_token` chunk by chunk (`plan_forward`: the same selections, each through `select`); the
forwards before it keep the batched path (a 1M-token prompt's prefill is not slowed): the library is not changed, and
a cache used outside the `with` block selects as it always does. Only attention calls whose query chunk holds a token
at or after `from_token` are touched (with `kvtier.tools.niah.answer`, `from_token = len(ids) - 1`
picks the answer's queries: the last prompt token, then each generated token).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from kvtier.cache import ReAttentionCache
from kvtier.config import ReAttentionConfig
from kvtier.layer import ReAttentionLayer
from kvtier.policies import Policy, best_run_last, rank_spans
from kvtier.regions import spans_to_seal

Select = Callable[[torch.Tensor], torch.Tensor]  # ReAttentionLayer.select: queries [B, Hq, c, D] -> ids [B, Hkv, k]
TokenRanges = Sequence[tuple[int, int]]  # [start, end) token ranges of one row's needle(s)


@dataclass(frozen=True)
class NeedleSpans:
    """Where a needle's tokens are for one attention call: `ids`, the sealed middle spans holding some of them
    (ascending); `by_construction`, the token ranges in scope whatever is selected (the global region, or still in the
    local window)."""

    ids: tuple[int, ...]
    by_construction: tuple[tuple[int, int], ...]


def sealed_spans(tokens: int, config: ReAttentionConfig) -> int:
    """How many middle spans a layer holding `tokens` tokens has sealed. `ReAttentionLayer.ingest` seals whole spans
    from the local window's front, in token order, seal_group at a time (kvtier.regions.spans_to_seal), so span j
    holds tokens [global_size + j*span_size, global_size + (j+1)*span_size)."""
    return spans_to_seal(0, tokens - config.global_size, config.local_size, config.span_size, config.seal_group)


def spans_of(needle_tokens: TokenRanges, config: ReAttentionConfig, tokens: int | None = None) -> NeedleSpans:
    """[start, end) token ranges -> the middle spans holding those tokens once a layer holds `tokens` tokens;
    tokens of the global region, and (given `tokens`) those still in the local window, are `by_construction`.
    Without `tokens`, every token after the global region counts in the span it is (or will be) sealed in."""
    first_local = None if tokens is None else config.global_size + sealed_spans(tokens, config) * config.span_size
    ids: set[int] = set()
    always: list[tuple[int, int]] = []
    for start, end in needle_tokens:
        if not 0 <= start < end:
            raise ValueError(f"a needle's token range must be [start, end) with 0 <= start < end, got ({start}, {end})")
        if tokens is not None and end > tokens:
            raise ValueError(f"needle tokens [{start}, {end}) reach beyond the {tokens} tokens the layer holds")
        if start < config.global_size:
            always.append((start, min(end, config.global_size)))
        middle_start = max(start, config.global_size)
        middle_end = end if first_local is None else min(end, first_local)
        if middle_start < middle_end:
            first = (middle_start - config.global_size) // config.span_size
            last = (middle_end - 1 - config.global_size) // config.span_size
            ids.update(range(first, last + 1))
        if first_local is not None and end > max(start, first_local):
            always.append((max(start, first_local), end))
    return NeedleSpans(tuple(sorted(ids)), tuple(always))


def policy_order(policy: Policy, queries: torch.Tensor, summaries: torch.Tensor, per_kv_head: bool) -> torch.Tensor:
    """queries [B, Hq, c, D] pre-RoPE, summaries [B, Hkv, n, c, D] -> every span id [B, Hsel, n], best first: the whole
    ranking whose first top_k `Policy.select` returns (sorted), computed with the policy's PyTorch `aggregate` and
    `rank_spans`, heads merged as `best_spans` merges them (Hsel = Hkv when `per_kv_head`, else 1)."""
    batch, q_heads, _, dim = queries.shape
    kv_heads = summaries.shape[1]
    grouped = queries.float().view(batch, kv_heads, q_heads // kv_heads, -1, dim)  # [B, Hkv, g, c, D]
    primary, secondary = policy.aggregate(grouped, summaries.float())  # each [B, Hkv, n]
    if not per_kv_head:
        primary = primary.amax(1, keepdim=True) if policy.aggregation == "max" else primary.sum(1, keepdim=True)
        secondary = secondary.amax(1, keepdim=True)
    return rank_spans(primary, secondary)


@dataclass
class SelectionRecord:
    """One observed attention call of one layer, JSON-ready (dataclasses.asdict). Per row: the selection (per
    selecting head: one head unless per_kv_head), the needle's sealed spans, each one's rank under the policy's own
    ordering per selecting head (0 = best; None when the policy ranks no spans, e.g. `streaming`), whether each was
    selected (by every selecting head), and whether every needle token was in the scope (each needle span selected,
    the rest in scope by construction)."""

    layer: int
    query: int  # the layer's n-th observed call: with answer(), 0 = the last prompt token, n = the n-th new token
    tokens: int  # tokens the layer held, this chunk's included
    sealed: int  # middle spans sealed
    selected: list[list[list[int]]]  # [B][Hsel][k]
    needle_spans: list[list[int]]  # [B][spans]
    ranks: list[list[list[int]] | None]  # [B][Hsel][spans]
    needle_selected: list[list[bool]]  # [B][spans]
    in_scope: list[bool]  # [B]


@dataclass
class Observation:
    """What `observe_selection` saw: one record per observed call, in call order."""

    records: list[SelectionRecord] = field(default_factory=list)

    def of_layer(self, layer: int) -> list[SelectionRecord]:
        return [record for record in self.records if record.layer == layer]


@contextmanager
def observe_selection(cache: ReAttentionCache, needles: Sequence[TokenRanges] | None = None,
                      from_token: int = 0) -> Iterator[Observation]:
    """Record every layer's selection for the attention calls whose query chunk holds a token at index >= from_token
    (`needles`: one list of [start, end) token ranges per row of the batch, or None to record selections only).
    Yields the Observation, filled as the model runs; `select` is restored on exit."""

    def wrap(index: int, layer: ReAttentionLayer, select: Select) -> Select:
        calls = 0

        def observed(queries: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            ids = select(queries)  # [B, Hkv, k]
            tokens = layer.tokens_held()
            if tokens > from_token:
                observation.records.append(_record(layer, index, calls, tokens, queries, ids, needles))
                calls += 1
            return ids

        return observed

    observation = Observation()
    with _wrapped_selects(cache, wrap, from_token):
        yield observation


@contextmanager
def force_spans(cache: ReAttentionCache, span_ids_per_row: Sequence[Sequence[int]],
                from_token: int = 0) -> Iterator[None]:
    """The oracle: in the attention calls whose query chunk holds a token at index >= from_token, every layer's
    selection holds the given sealed spans (one list of span ids per row; spans not sealed yet are left out: their
    tokens are in the local window). They replace the policy's lowest-ranked picks under its own ordering
    (`policy_order`), so the selection stays unique and no longer than the policy's, laid out as the policy lays out
    its own (consensus' `layout`: the forced spans ranked first, so best-last puts them next to the local window).
    A policy that always keeps span 0 (consensus' `keep_first_span`) keeps it under the oracle too, ranked right after
    the forced spans, where they leave room. For tests and diagnosis only; `select` is restored on exit."""
    forced_rows = [sorted(set(map(int, ids))) for ids in span_ids_per_row]
    top_k = cache.config.top_k
    if any(len(ids) > top_k for ids in forced_rows):
        raise ValueError(f"cannot force {max(map(len, forced_rows))} spans into a selection of top_k = {top_k}; "
                         "force fewer spans or raise top_k")

    def wrap(index: int, layer: ReAttentionLayer, select: Select) -> Select:
        def forced(queries: torch.Tensor) -> torch.Tensor:
            ids = select(queries)  # [B, Hkv, k]
            if layer.tokens_held() <= from_token:
                return ids
            _check_rows("force_spans", len(forced_rows), ids.shape[0])
            sealed = [[span for span in forced if span < len(layer.table)] for forced in forced_rows]
            if not any(sealed):  # the spans to force are all still in the local window
                return ids
            if getattr(layer.policy, "keep_first_span", False):  # span 0 too, where the forced spans leave room
                sealed = [forced if 0 in forced or len(forced) >= top_k else forced + [0] for forced in sealed]
            picks = ids[:, : _selecting_heads(layer)]  # [B, Hsel, k]
            order = policy_order(layer.policy, queries, layer.table.summaries.view(), layer.config.per_kv_head)
            layout = getattr(layer.policy, "layout", "text")
            return _replace_lowest(picks, order, sealed, layout).expand(-1, layer.kv_heads, -1)

        return forced

    with _wrapped_selects(cache, wrap, from_token):
        yield


def _replace_lowest(picks: torch.Tensor, order: torch.Tensor, forced_rows: list[list[int]],
                    layout: str = "text") -> torch.Tensor:
    """picks [B, Hsel, k] in any order, order [B, Hsel, n] best first, sealed spans to force per row -> [B, Hsel, k]:
    each row's forced spans, and the best-ranked of its picks in the room left, laid out as `layout` says
    (policies.base.best_spans' layouts; the forced spans rank first)."""
    ranks = _ranks(order).tolist()  # [B][Hsel][n]
    rows = []
    for row, (forced, heads) in enumerate(zip(forced_rows, picks.tolist())):
        selections = []
        for head, chosen in enumerate(heads):
            room = max(len(chosen) - len(forced), 0)
            kept = sorted((span for span in chosen if span not in forced), key=ranks[row][head].__getitem__)[:room]
            selections.append(forced + kept)  # best first
        rows.append(selections)
    ranked = torch.tensor(rows, dtype=picks.dtype, device=picks.device).view(picks.shape)
    return best_run_last(ranked) if layout == "best_last" else ranked.sort(dim=-1).values


def _record(layer: ReAttentionLayer, index: int, query: int, tokens: int, queries: torch.Tensor, ids: torch.Tensor,
            needles: Sequence[TokenRanges] | None) -> SelectionRecord:
    if needles is not None:
        _check_rows("observe_selection", len(needles), ids.shape[0])
    picks = ids[:, : _selecting_heads(layer)].tolist()  # [B][Hsel][k]
    summaries = layer.table.summaries.view()  # [B, Hkv, n, c, D]
    ranks = None
    if summaries.shape[3] > 0:  # a policy without summaries (`streaming`) ranks nothing
        order = (policy_order(layer.policy, queries, summaries, layer.config.per_kv_head) if summaries.shape[2]
                 else ids.new_empty(len(picks), len(picks[0]), 0))  # [B, Hsel, n]; none sealed yet: nothing to rank
        ranks = _ranks(order).tolist()
    needle_spans, needle_ranks, needle_selected = [], [], []
    for row, heads in enumerate(picks):
        fed = [] if needles is None else [(start, min(end, tokens)) for start, end in needles[row] if start < tokens]
        spans = list(spans_of(fed, layer.config, tokens).ids)
        needle_spans.append(spans)
        needle_ranks.append(None if ranks is None else [[ranks[row][head][span] for span in spans]
                                                        for head in range(len(heads))])
        needle_selected.append([all(span in chosen for chosen in heads) for span in spans])
    return SelectionRecord(layer=index, query=query, tokens=tokens, sealed=len(layer.table), selected=picks,
                           needle_spans=needle_spans, ranks=needle_ranks, needle_selected=needle_selected,
                           in_scope=[all(selected) for selected in needle_selected])


def _check_rows(hook: str, given: int, batch: int) -> None:
    if given != batch:
        raise ValueError(f"{hook} got needles for {given} rows but the cache holds {batch}; give one list per row")


def _ranks(order: torch.Tensor) -> torch.Tensor:
    """order [..., n] (span ids, best first) -> rank [..., n] of each span id (0 = best)."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _selecting_heads(layer: ReAttentionLayer) -> int:
    return layer.kv_heads if layer.config.per_kv_head else 1


_ABSENT = object()


@contextmanager
def _wrapped_selects(cache: ReAttentionCache, wrap: Callable[[int, ReAttentionLayer, Select], Select],
                     from_token: int) -> Iterator[None]:
    """Each layer's `select` replaced by wrap(layer index, layer, the select it had), and its `plan_forward` by one
    that takes a forward chunk by chunk once it reaches token `from_token` (so every chunk of it goes through
    `select`), as instance attributes put back on exit (hooks nest: the innermost wraps the library's, and each is
    undone in turn)."""
    previous = [(vars(layer).get("select", _ABSENT), vars(layer).get("plan_forward", _ABSENT)) for layer in cache.layers]
    for index, layer in enumerate(cache.layers):
        layer.select = wrap(index, layer, layer.select)
        layer.plan_forward = _batched_before(layer, layer.plan_forward, from_token)
    try:
        yield
    finally:
        for layer, saved in zip(cache.layers, previous):
            for name, before in zip(("select", "plan_forward"), saved):
                if before is _ABSENT:
                    delattr(layer, name)
                else:
                    setattr(layer, name, before)


def _batched_before(layer: ReAttentionLayer, plan_forward: Callable, from_token: int) -> Callable:
    """plan_forward for the hooks: None (chunk by chunk) for a forward whose chunks reach token `from_token`, the
    layer's own plan for one that ends before it (plan_forward's bounds count from the first chunk not yet taken in)."""

    def planned(bounds: list[tuple[int, int]]):
        return None if layer.tokens_held() + bounds[-1][1] > from_token else plan_forward(bounds)

    return planned
