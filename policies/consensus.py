"""`consensus`: the spans the last `window` queries (the question, at the end of a prompt) attend to, as voted by the
layers so far.

Per layer, the observation window's pre-RoPE queries are centred (their mean per head removed: what every query of
the window asks, e.g. the question's function words and the attention-sink direction, is not content) and scored
against every middle key; a span's score is its best key's, and each (query, head) spreads one unit of attention over
the spans (softmax at the model's scale). Layer l selects by the sum of that attention mass over the voting layers
0..l of the same query chunk (layers vote; no layer alone ranks a needle in natural prose reliably, their sum does:
RESULTS 14). A span's neighbours share its score (max-pooled), so a sentence cut by a span border comes in whole. At
1M the votes of layers 2-17 hold the needle and layer 18's mass pushes it out (RESULTS 25d), so by default only the
first 60% of the layers vote (`vote_layers`) and the later ones select by their sum (RESULTS 26: SmolLM2 finds 5/6
needles at 1M instead of 2/6, and as many at 16K and 64K). Two options weigh a layer's peaks less instead: `vote:
rank` (reciprocal rank fusion: a layer adds 1 / (rank_offset + the span's rank)), so a layer whose mass piles onto a
few spans counts no more than one that spreads it, and `vote: log`, between the two.

Decode steps reuse their layer's last selection until spans are sealed (seal_group of them every seal_group *
span_size steps: the newest text becomes selectable) or, if set, `refresh` steps have passed, then re-score, with the
window sliding over the generated queries. By default (`decode_selection: final`) the last voting layer hands its
selection, the whole vote's, to the layers before it for those steps: an early layer's own sum is near chance among
the 32K spans of a 1M prompt (RESULTS 26), and the answer's tokens read what the question's vote chose. So a decode
runs eagerly only where it seals anyway, and statically in between (kvtier.fast_decode). Span 0, the text right
after the global tokens, is always chosen (`keep_first_span`; where its rank leaves it out it comes in ranked best,
next to the local window, and the last pick goes): at 1M a needle across that border never reached the scope, and
read where it lies in the text it is found less often than read next to the question (RESULTS 28). In a prompt's
batched forward (select_chunks) a query chunk scores every middle key for its window: the one prefill cost that grows
with the prompt (quadratic in it). With `stride` s > 1 only every s-th chunk of a forward and its last (the
question's) score; the chunks between reuse the selection before them. The "summary" is the span's full keys (as
`reattention`'s), so every middle key stays on the model's device."""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from kvtier.buffers import buffer, gather_rows, upload
from kvtier.prefill import QueryChunk

from .base import LAYOUTS, best_spans
from .reattention import ReAttentionPolicy


_MASS_BLOCK_BYTES = 2**29  # select_chunks scores chunks in blocks whose fp32 scores stay within this
VOTES = ("mass", "rank", "log")
DECODE_SELECTIONS = ("final", "layer", "final_all")


@dataclass
class _LayerState:
    ring: torch.Tensor | None = None  # [B, Hq, window, D] the last queries seen, pre-RoPE, in no particular order
    filled: int = 0  # queries held (ring[:, :, :filled]; the ring fills from slot 0 before it wraps)
    next: int = 0  # the slot the next query is written to
    selected: torch.Tensor | None = None  # [B, Hsel, k] the last selection
    steps: int = 0  # decode steps that reused `selected`
    spans: int | None = None  # spans held when `selected` was chosen (None: unknown, from a format-3 save without it)

    @property
    def window(self) -> torch.Tensor | None:
        """[B, Hq, filled, D] the queries held."""
        return None if self.ring is None else self.ring[:, :, : self.filled]

    def oldest_first(self) -> torch.Tensor:
        """The window [B, Hq, filled, D] oldest query first: remembered in this order, a restored ring overwrites its
        queries in the order this one does."""
        return torch.cat((self.ring[:, :, self.next : self.filled], self.ring[:, :, : self.next]), dim=2)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i], index [B'] (any order, repeats allowed)."""
        if self.ring is not None:
            self.ring = gather_rows(self.ring, index)
        if self.selected is not None:
            self.selected = gather_rows(self.selected, index)

    def record_at(self, query: torch.Tensor, slot: torch.Tensor) -> None:
        """query [B, Hq, 1, D] into the ring at `slot` ([1] on the device: next, as the host knows it)."""
        self.ring.index_copy_(2, slot, query)

    def recorded(self, size: int) -> None:
        """Account for one query written at `next` by record_at."""
        self.next, self.filled = (self.next + 1) % size, min(self.filled + 1, size)

    def remember(self, queries: torch.Tensor, size: int) -> torch.Tensor:
        """Write the newest of queries [B, Hq, c, D] over the oldest held (no copy of the rest), -> the window
        [B, Hq, filled, D]. A sum over queries, the window's mass needs no order."""
        if self.ring is None:
            self.ring = buffer((*queries.shape[:2], size, queries.shape[3]), queries.dtype, queries.device)
        new = queries[:, :, -size:]
        count = new.shape[2]
        first = min(count, size - self.next)
        self.ring[:, :, self.next : self.next + first] = new[:, :, :first]
        if count > first:  # wrapped
            self.ring[:, :, : count - first] = new[:, :, first:]
        self.next, self.filled = (self.next + count) % size, min(self.filled + count, size)
        return self.window


@dataclass
class ConsensusPolicy(ReAttentionPolicy):
    """Summaries as `reattention`'s (the span's keys); its own scoring and selection, so no scoring kernel: on the
    kernel path only its span scores (`span_best_scores`) run as one (kernel_span_scores)."""

    aggregation: str = "sum"
    window: int = 64  # observation queries: the last `window` queries of the sequence
    refresh: int | None = None  # decode steps at most between re-scorings; None: only when spans are sealed
    neighbours: bool = True  # a span's neighbours share its score
    # the chosen spans' order in the scope: "best_last" (policies.base.best_run_last: the best run of spans next to the
    # local window, i.e. nearest the question; RESULTS 23) or "text"
    layout: str = "best_last"
    # a batched forward's chunks score every `stride`-th chunk and the last; the others reuse the selection before them
    # (1: every chunk scores, exactly as chunk by chunk; RESULTS 24 measures the trade)
    stride: int = 1
    # what a layer adds to the vote: "mass" (its attention mass per span), "rank" (1 / (rank_offset + the span's rank
    # under that mass), 0 the best) or "log" (log(1 + the mass over a uniform share): a layer's peaks count less)
    vote: str = "mass"
    rank_offset: int = 60
    # the layers that vote: a count, or a share of the model's layers (rounded; every layer outside a cache, which
    # tells the policy the model's depth); the later layers select by their sum and score nothing. None: every layer.
    # 0.6 = SmolLM2's first 18 of 30: at 1M their votes hold the needle and layer 18's mass pushes it out (RESULTS 26)
    vote_layers: int | float | None = 0.6
    # what decode steps reuse between re-scorings: "final" (every layer the selection of the forward's whole vote, the
    # one the layers past vote_layers select by: an early layer's own sum is near chance among many spans, RESULTS 27)
    # or "layer" (each layer its own: the sum of the votes up to it); "final_all": as final, and at a decode step that
    # re-scores the layers before the last voter keep the last whole vote's selection too (they still vote)
    decode_selection: str = "final"
    # span 0, the text right after the global tokens, is always in the scope (where its rank leaves it out it comes in
    # ranked best, next to the local window, and the last pick goes): at 1M a needle there never reached the scope,
    # and forced in it was read (RESULTS 28)
    keep_first_span: bool = True
    span_block: int = 1024  # spans scored at once: bounds the [B, Hkv, g, window, block, S] score tensor
    # what computes span_best_scores' result instead of it: kvtier.kernels.window_mass on the kernel path (set by
    # kvtier.dispatch at each selection), None elsewhere
    span_scores_kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = field(
        default=None, init=False, repr=False, compare=False)

    name = "consensus"
    kernel_span_scores = "dot"
    keeps_selection = True
    _layers: dict[int, _LayerState] = field(default_factory=dict, init=False, repr=False)
    _votes: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for option in ("window", "refresh", "stride", "span_block", "rank_offset"):
            value = getattr(self, option)
            if option == "refresh" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"consensus policy: {option} must be a positive integer, got {value!r}")
        if not isinstance(self.keep_first_span, bool):
            raise ValueError(f"consensus policy: keep_first_span must be true or false, got {self.keep_first_span!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"consensus policy: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.vote not in VOTES:
            raise ValueError(f"consensus policy: vote must be one of {VOTES}, got {self.vote!r}")
        if self.decode_selection not in DECODE_SELECTIONS:
            raise ValueError(f"consensus policy: decode_selection must be one of {DECODE_SELECTIONS}, "
                             f"got {self.decode_selection!r}")
        share = isinstance(self.vote_layers, float) and 0 < self.vote_layers <= 1
        count = isinstance(self.vote_layers, int) and not isinstance(self.vote_layers, bool) and self.vote_layers > 0
        if not (self.vote_layers is None or share or count):
            raise ValueError("consensus policy: vote_layers must be a layer count (a positive integer), a share of the "
                             f"model's layers in (0, 1] or null (every layer), got {self.vote_layers!r}")

    def reset(self, layer: int) -> None:
        self._layers.pop(layer, None)
        self._votes.clear()  # a vote lives within one forward; a reset comes between forwards

    def keep_rows(self, layer: int, index: torch.Tensor) -> None:
        if layer in self._layers:
            self._layers[layer].keep_rows(index)
        self._votes.clear()  # a vote lives within one forward; rows change between forwards

    def layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        state = self._layers.get(layer)
        if state is None or state.window is None:
            return {}
        saved = {"window": state.oldest_first(), "steps": torch.tensor([state.steps])}
        if state.spans is not None:
            saved["spans"] = torch.tensor([state.spans])
        return saved if state.selected is None else saved | {"selected": state.selected}

    def restore_layer_state(self, layer: int, state: dict[str, torch.Tensor]) -> None:
        if state:
            spans = int(state["spans"][0]) if "spans" in state else None
            restored = _LayerState(selected=state.get("selected"), steps=int(state["steps"][0]), spans=spans)
            restored.remember(state["window"], self.window)
            self._layers[layer] = restored

    def reuses_selection(self, layer: int) -> bool:
        state = self._layers.get(layer)
        return state is not None and state.selected is not None and self._fresh(state)

    def _fresh(self, state: _LayerState) -> bool:
        """Whether a decode step may still reuse the selection (fewer than `refresh` steps since it was made)."""
        return self.refresh is None or state.steps < self.refresh

    def reused_query_slot(self, layer: int) -> int:
        return self._layers[layer].next

    def reuse_selection(self, layer: int, query: torch.Tensor, slot: torch.Tensor) -> None:
        self._layers[layer].record_at(query, slot)

    def selection_reused(self, layer: int) -> None:
        state = self._layers[layer]
        state.recorded(self.window)
        state.steps += 1

    def aggregate(self, grouped: torch.Tensor, summaries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's ranking, as kvtier.tools.diagnose reads it: the window mass of these queries [B, Hkv, g, q, D]
        per KV head (without the other layers' votes) -> (mass, mass) [B, Hkv, n]."""
        batch, kv_heads, group, n_queries, dim = grouped.shape
        mass = self.window_mass(grouped.reshape(batch, kv_heads * group, n_queries, dim), summaries, True)
        return mass, mass

    def select_at(self, queries: torch.Tensor, summaries: torch.Tensor, top_k: int, per_kv_head: bool, *,
                  layer: int, tokens: int) -> torch.Tensor:
        if queries.shape[1] % summaries.shape[1]:
            raise ValueError(f"{queries.shape[1]} query heads cannot be grouped over {summaries.shape[1]} KV heads")
        state = self._layers.setdefault(layer, _LayerState())
        window = state.remember(queries, self.window)  # [B, Hq, <= window, D]
        k = min(top_k, summaries.shape[2])
        if k == 0:
            return torch.empty(queries.shape[0], summaries.shape[1] if per_kv_head else 1, 0, dtype=torch.long,
                               device=queries.device)
        n_spans = summaries.shape[2]
        reuse = (state.selected is not None and state.selected.shape[-1] == k and self._fresh(state)
                 and state.spans in (None, n_spans))
        if queries.shape[2] == 1 and reuse:
            state.steps += 1
            return state.selected
        if layer == 0:  # a new chunk's vote: keep only the earlier chunks of this forward that layer 0 began
            self._votes = {t: vote for t, vote in self._votes.items() if vote[0] == 0 and t < tokens}
        earlier = self._votes.get(tokens)
        if earlier is not None and not self._votes_at(layer):
            votes = earlier[1].to(queries.device)
        else:
            mass = self.layer_vote(self.window_mass(window, summaries, per_kv_head))  # [B, Hsel, n]
            # a layer on another device (device_map) adds the earlier layers' votes on its own
            votes = mass if earlier is None else earlier[1].to(mass.device) + mass
        self._votes[tokens] = (layer, votes)
        if queries.shape[2] == 1 and self._keeps_whole_vote(layer, state, k):
            state.steps, state.spans = 0, n_spans
            return state.selected
        score = F.max_pool1d(votes, 3, 1, 1) + 1e-3 * votes if self.neighbours and votes.shape[-1] > 1 else votes
        state.selected = best_spans(score, votes, k, layout=self.layout, keep_first=self.keep_first_span)
        state.steps, state.spans = 0, n_spans
        self._share_final(layer, state.selected, n_spans)
        return state.selected

    def select_chunks(self, queries: torch.Tensor, summaries: torch.Tensor, chunks: list[QueryChunk], top_k: int,
                      per_kv_head: bool, *, layer: int) -> list[torch.Tensor] | None:
        """select_at's choice for every chunk of a forward in one pass (the same windows, votes and ranking; the mass
        of spans sealed after a chunk masked out of its softmax), once the window is full and every chunk has top_k
        spans to choose from; None before (chunk by chunk)."""
        state = self._layers.get(layer)
        grouped_heads = queries.shape[1] % summaries.shape[1] == 0
        if state is None or state.filled < self.window or chunks[0].spans < max(top_k, 1) or not grouped_heads:
            return None
        n_spans = chunks[-1].spans
        windows, next_slot = self._chunk_windows(state, queries, chunks)  # [B, Hq, m, window, D]
        state.ring.copy_(windows[:, :, -1])  # the ring as the last chunk leaves it, slot for slot
        state.next = next_slot
        scoring = self._scoring_chunks(state, len(chunks), top_k)  # the chunks that score, ascending
        spans = upload(torch.tensor([chunks[at].spans for at in scoring]), queries.device)  # [m']
        beyond = torch.arange(n_spans, device=queries.device)[None, :] >= spans[:, None]  # [m', n] sealed later
        key = chunks[-1].tokens
        if layer == 0:  # a new vote: keep only the earlier chunks of this forward that layer 0 selected one by one
            self._votes = {t: vote for t, vote in self._votes.items() if vote[0] == 0 and t < chunks[0].tokens}
        earlier = self._votes.get(key)
        shape = (queries.shape[0], summaries.shape[1] if per_kv_head else 1, len(scoring), n_spans)
        if earlier is not None and not self._votes_at(layer) and earlier[1].shape == shape:
            votes = earlier[1].to(queries.device)
        else:
            if len(scoring) < len(chunks):  # [B, Hq, m', window, D]; the index uploaded without a wait for the device
                windows = windows.index_select(2, _device_index(tuple(scoring), queries.device))
            mass = torch.cat([self.chunks_mass(windows[:, :, block], summaries[:, :, :n_spans], per_kv_head,
                                               beyond[block])
                              for block in self._chunk_blocks(windows.shape, n_spans)], dim=2)  # [B, Hsel, m', n]
            mass = self.layer_vote(mass, beyond)
            votes = mass if earlier is None else earlier[1].to(mass.device) + mass
        self._votes[key] = (layer, votes)
        score = votes
        if self.neighbours:
            score = F.max_pool1d(votes.flatten(0, 1), 3, 1, 1).view_as(votes) + 1e-3 * votes
        chosen = best_spans(score.masked_fill(beyond, -torch.inf), votes.masked_fill(beyond, -torch.inf), top_k,
                            layout=self.layout, keep_first=self.keep_first_span)
        previous, scored = state.selected, chosen.unbind(2)  # [B, Hsel, m', k] -> m' of [B, Hsel, k]
        state.selected, state.steps, state.spans = scored[-1], 0, n_spans  # the last chunk always scores
        self._share_final(layer, state.selected, n_spans)
        return [previous if at < scoring[0] else scored[bisect.bisect_right(scoring, at) - 1]
                for at in range(len(chunks))]

    def _votes_at(self, layer: int) -> bool:
        """Whether `layer` adds to the vote (vote_layers); a later layer selects by the earlier layers' sum."""
        count = self._voting_layers()
        return count is None or layer < count

    def _voting_layers(self) -> int | None:
        """How many layers vote: vote_layers resolved against the model's depth (a cache tells the policy); None where
        that is unknown (a share, or every layer, outside a cache)."""
        count = self.vote_layers
        if isinstance(count, float):
            count = None if self.num_layers is None else max(1, round(count * self.num_layers))
        elif count is None:
            count = self.num_layers
        return count if count is None or self.num_layers is None else min(count, self.num_layers)

    def _keeps_whole_vote(self, layer: int, state: _LayerState, k: int) -> bool:
        """Whether a re-scoring decode step of `layer` keeps the last whole vote's selection (decode_selection
        "final_all", a layer before the last voter, a selection of k spans held)."""
        count = self._voting_layers()
        return (self.decode_selection == "final_all" and count is not None and layer < count - 1
                and state.selected is not None and state.selected.shape[-1] == k)

    def _share_final(self, layer: int, selected: torch.Tensor, n_spans: int) -> None:
        """With decode_selection "final" or "final_all", at the forward's last voting layer: the earlier layers keep its
        selection [B, Hsel, k] (the whole vote's) for the decode steps that reuse theirs."""
        count = self._voting_layers()
        if self.decode_selection == "layer" or count is None or layer != count - 1:
            return
        for earlier, state in self._layers.items():
            if earlier < layer and state.selected is not None:
                state.selected, state.spans = selected.to(state.selected.device), n_spans

    def _scoring_chunks(self, state: _LayerState, count: int, top_k: int) -> list[int]:
        """Which of a forward's `count` chunks score (the others reuse the selection before them): every stride-th,
        counted from the forward's start, and the last; the first too where the selection held has not top_k spans."""
        scoring = [at for at in range(count) if (at + 1) % self.stride == 0 or at == count - 1]
        held = state.selected is not None and state.selected.shape[-1] == top_k
        return scoring if held or scoring[0] == 0 else [0, *scoring]

    def _chunk_windows(self, state: _LayerState, queries: torch.Tensor,
                       chunks: list[QueryChunk]) -> tuple[torch.Tensor, int]:
        """Each chunk's observation window as the full ring holds it after `remember` of the chunk's queries, slot
        for slot (so its sums run in the order chunk by chunk runs them), read from `[the window held before the
        forward, oldest first | queries [B, Hq, q, D]]` -> ([B, Hq, m, window, D], the ring's next slot after the
        last chunk)."""
        bounds = tuple((chunk.start, chunk.end) for chunk in chunks)
        index, next_slot = _ring_windows(self.window, state.next, bounds, queries.device)
        stream = torch.cat((state.oldest_first(), queries), dim=2)  # [B, Hq, window + q, D]
        windows = stream.index_select(2, index)  # [B, Hq, m * window, D]
        return windows.unflatten(2, (len(chunks), self.window)), next_slot

    def _chunk_blocks(self, shape: torch.Size, n_spans: int) -> list[slice]:
        """Chunks scored at once: their [B, Hq, chunks, window, n] fp32 scores within _MASS_BLOCK_BYTES."""
        batch, q_heads, m, w, _ = shape
        step = max(1, _MASS_BLOCK_BYTES // max(batch * q_heads * w * n_spans * 4, 1))
        return [slice(start, start + step) for start in range(0, m, step)]

    def layer_vote(self, mass: torch.Tensor, beyond: torch.Tensor | None = None) -> torch.Tensor:
        """One layer's attention mass [..., n] -> what it adds to the vote [..., n]: the mass; with vote "rank"
        1 / (rank_offset + each span's rank under it); with "log" log(1 + mass / the uniform share). Spans `beyond`
        [m, n] (sealed after the chunk; mass [..., m, n], 0 there) add 0 and count for neither the ranks nor the
        uniform share: the spans before them vote as in a chunk-by-chunk selection."""
        if self.vote == "mass":
            return mass
        if self.vote == "log":
            spans = mass.shape[-1] if beyond is None else (~beyond).sum(-1, keepdim=True)  # [m, 1] spans in the softmax
            return torch.log1p(mass * spans / mass.sum(-1, keepdim=True).clamp(min=1e-30))
        ranks = mass.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # [..., n], 0 the best
        vote = 1.0 / (self.rank_offset + ranks.float())
        return vote if beyond is None else vote.masked_fill(beyond, 0.0)

    def window_mass(self, window: torch.Tensor, summaries: torch.Tensor, per_kv_head: bool) -> torch.Tensor:
        """window [B, Hq, w, D] pre-RoPE queries, summaries (the keys) [B, Hkv, n, S, D] -> each span's attention mass
        [B, Hsel, n] fp32 (chunks_mass of one window)."""
        return self.chunks_mass(window[:, :, None], summaries, per_kv_head)[:, :, 0]

    def chunks_mass(self, windows: torch.Tensor, summaries: torch.Tensor, per_kv_head: bool,
                    beyond: torch.Tensor | None = None) -> torch.Tensor:
        """windows [B, Hq, m, w, D] pre-RoPE queries (one window per chunk), summaries (the keys) [B, Hkv, n, S, D]
        -> each span's attention mass per window [B, Hsel, m, n] fp32: each window's queries centred (w > 1), each
        (query, head) spread over the spans by a softmax of the span's best key score at scale 1/sqrt(D), summed over
        queries and heads; `beyond` [m, n] bool: spans left out of a window's softmax (mass 0). On a GPU the dot
        products run in the keys' dtype (fp32 accumulation), elsewhere in fp32; the best scores come from
        `span_scores_kernel` where dispatch set it, else from span_best_scores."""
        batch, q_heads, m, w, dim = windows.shape
        kv_heads, n_spans = summaries.shape[1], summaries.shape[2]
        queries = windows.float()
        if w > 1:
            queries = queries - queries.mean(3, keepdim=True)
        dtype = summaries.dtype if summaries.is_cuda else torch.float32
        grouped = queries.to(dtype).view(batch, kv_heads, q_heads // kv_heads, m * w, dim)  # [B, Hkv, g, m*w, D]
        best = (self.span_scores_kernel or self.span_best_scores)(grouped, summaries)  # [B, Hkv, g, m*w, n] fp32
        best = best.view(batch, kv_heads, q_heads // kv_heads, m, w, n_spans)
        if beyond is not None:
            best = best.masked_fill(beyond[:, None, :], -torch.inf)
        mass = torch.softmax(best * dim ** -0.5, dim=-1).sum((2, 4))  # [B, Hkv, m, n]
        return mass if per_kv_head else self.all_heads(mass).sum(1, keepdim=True)

    def span_best_scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """queries [B, Hkv, g, w, D], keys [B, Hkv, n, S, D] -> best [B, Hkv, g, w, n] fp32: each span's best key
        score q . k per (query head, query), computed in the queries' dtype (the keys cast to it) `span_block` spans
        at a time."""
        blocks = [torch.einsum("bkgwd,bknsd->bkgwns", queries, keys[:, :, start:start + self.span_block]
                               .to(queries.dtype)).amax(-1)
                  for start in range(0, keys.shape[2], self.span_block)]  # each [B, Hkv, g, w, block]
        return torch.cat(blocks, dim=-1).float()


@functools.lru_cache(maxsize=16)
def _device_index(index: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """index on `device` as int64 [len(index)], uploaded once: every layer of a forward asks the same."""
    return upload(torch.tensor(index), device)


@functools.lru_cache(maxsize=4)
def _ring_windows(size: int, next_slot: int, bounds: tuple[tuple[int, int], ...],
                  device: torch.device) -> tuple[torch.Tensor, int]:
    """The ring of `size` slots (its next slot `next_slot`, full) after remembering the queries of each chunk of
    `bounds` in turn -> (for each chunk the stream index of each slot's query [m * size] on `device`, the stream being
    `[the ring oldest first | the forward's queries]`; the next slot after the last chunk). Every layer of a forward
    asks the same: computed once."""
    slots = [(slot - next_slot) % size for slot in range(size)]
    index = []
    for start, end in bounds:
        newest = range(size + max(start, end - size), size + end)
        for offset, query in enumerate(newest):
            slots[(next_slot + offset) % size] = query
        next_slot = (next_slot + len(newest)) % size
        index += slots
    return upload(torch.tensor(index), device), next_slot
