"""The interface every selection policy shares: summarise a sealed span, score a query chunk, pick <= top_k spans."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

AGGREGATIONS = ("vote", "max", "sum")

# Each kernel declaration and the methods whose work its kernel does instead of them.
_KERNEL_REPLACES = {
    "kernel_summary": ("summarise", "summary_size"),
    "kernel_scoring": ("candidate_scores", "aggregate", "select"),
    "kernel_span_scores": ("span_best_scores",),
}


@dataclass
class Policy:
    """Base of all policies. A subclass sets `name`, and defines `summary_size`, `summarise`, `candidate_scores`.

    Scoring runs per (query token, query head) against each span's `m` candidates (its summary vectors, or for an
    upper-bound summary a single bound); `aggregation` turns those into one ranking per sequence (or per KV head):
      - "vote": each (query, head) votes for the spans holding its `votes` best candidates; most votes win, ties go
        to the higher best score, then to the earlier span;
      - "max":  a span's best candidate score over the chunk's queries and the heads;
      - "sum":  the sum over queries and heads of the span's best candidate score.

    Kernels: `kernel_summary` names the Triton kernel (kvtier.kernels) that computes `summarise` and `summary_size`,
    `kernel_scoring` the one that computes `candidate_scores`, `aggregate` and `select`; on the kernel path
    (kvtier.dispatch) it runs in their place, and None keeps the methods. A declaration covers only the methods it
    was declared with: a class that defines one of them (or gets it from a base listed before the declaring class)
    without declaring that kernel in its own body gets None, and runs its own methods. A subclass that only changes
    parameters keeps its parent's kernels, which take them from `aggregation`, `votes` and `kernel_summary_options`.
    `kernel_span_scores` serves a policy that scores its own way (`consensus`) and calls `span_best_scores`, each
    span's best key score per query: on the kernel path dispatch sets the policy's `span_scores_kernel` to that
    kernel, and the policy calls it instead (None elsewhere).
    """

    aggregation: str = "max"
    votes: int = 4
    query_block: int = 64  # queries scored at once: bounds the [B, Hkv, g, q, n, m] score tensor
    # under tensor parallelism (kvtier.parallel), what brings every rank's per-head scores to a selection shared by all
    # heads (set by the cache; None on one device)
    head_shards: Any = field(default=None, init=False, repr=False, compare=False)
    num_layers: int | None = field(default=None, init=False, repr=False, compare=False)  # the model's (set by the cache)

    name: ClassVar[str] = ""
    kernel_summary: ClassVar[str | None] = None  # "mean", "minmax" or "representatives" (kvtier.kernels.summarise)
    kernel_scoring: ClassVar[str | None] = None  # "dot" (best candidate's dot product) or "bound" (min/max bound)
    keeps_selection: ClassVar[bool] = False  # whether decode steps may reuse a selection (see reuses_selection)
    kernel_span_scores: ClassVar[str | None] = None  # "dot" (each span's best key, kvtier.kernels.window_mass)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        for declaration, methods in _KERNEL_REPLACES.items():
            declared_at = _defined_at(mro, declaration)
            if getattr(cls, declaration) is not None and any(_defined_at(mro, m) < declared_at for m in methods):
                setattr(cls, declaration, None)

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"{self.name} policy: aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}"
            )
        if isinstance(self.votes, bool) or not isinstance(self.votes, int) or self.votes < 1:
            raise ValueError(f"{self.name} policy: votes must be a positive integer, got {self.votes!r}")
        if isinstance(self.query_block, bool) or not isinstance(self.query_block, int) or self.query_block < 1:
            raise ValueError(f"{self.name} policy: query_block must be a positive integer, got {self.query_block!r}")

    # ---- what a policy defines ----------------------------------------------------------------------------------
    def summary_size(self, span_size: int) -> int:
        """c: how many D-vectors per KV head summarise one span."""
        raise NotImplementedError

    def summarise(self, keys: torch.Tensor) -> torch.Tensor:
        """keys [N, Hkv, S, D] (pre-RoPE, N sealed spans) -> summaries [N, Hkv, c, D] in the keys' dtype."""
        raise NotImplementedError

    def candidate_scores(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """queries [B, Hkv, g, q, D] fp32 (g = query heads per KV head), summaries [B, Hkv, n, c, D] fp32
        -> scores [B, Hkv, g, q, n, m] fp32, m candidates per span."""
        raise NotImplementedError

    def kernel_summary_options(self) -> dict[str, Any]:
        """The keyword arguments that kernel_summary's kernel (kvtier.kernels.summarise.summarise_spans) takes
        from this policy's parameters; none by default."""
        return {}

    # ---- shared machinery ---------------------------------------------------------------------------------------
    def select(self, queries: torch.Tensor, summaries: torch.Tensor, top_k: int, per_kv_head: bool) -> torch.Tensor:
        """queries [B, Hq, q, D] pre-RoPE, summaries [B, Hkv, n, c, D] -> span ids [B, Hsel, k] int64, ascending
        and unique, k = min(top_k, n); Hsel = Hkv when `per_kv_head`, else 1 (one selection for all heads).
        Query head h reads KV head h // (Hq // Hkv)."""
        batch, hq, _, dim = queries.shape
        hkv, n_spans = summaries.shape[1], summaries.shape[2]
        if min(top_k, n_spans) == 0:
            return torch.empty(batch, hkv if per_kv_head else 1, 0, dtype=torch.long, device=queries.device)
        if hq % hkv:
            raise ValueError(f"{hq} query heads cannot be grouped over {hkv} KV heads")
        grouped = queries.float().view(batch, hkv, hq // hkv, -1, dim)  # [B, Hkv, g, q, D]
        primary, secondary = self.aggregate(grouped, summaries.float())  # each [B, Hkv, n]
        if per_kv_head:
            return best_spans(primary, secondary, top_k)
        merge_heads = "max" if self.aggregation == "max" else "sum"
        return best_spans(self.all_heads(primary), self.all_heads(secondary), top_k, merge_heads)

    def all_heads(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [B, h, n] of the heads this process holds -> of every head of the layer: under tensor parallelism
        every rank's, gathered in head order (kvtier.parallel); on one device, scores itself."""
        return scores if self.head_shards is None else self.head_shards.gather(scores)

    def select_at(self, queries: torch.Tensor, summaries: torch.Tensor, top_k: int, per_kv_head: bool, *,
                  layer: int, tokens: int) -> torch.Tensor:
        """`select` as the cache calls it: `layer`, the calling layer's index, and `tokens`, the tokens it holds up to
        the end of the query chunk (the same for every layer selecting for that chunk). A policy that keeps state
        across layers or steps (`consensus`) overrides this; the others select from the queries alone. The ids come
        in scope order: the order the spans take in the scope, ascending (text order) unless the policy lays them
        out otherwise (consensus' `layout`)."""
        return self.select(queries, summaries, top_k, per_kv_head)

    def select_chunks(self, queries: torch.Tensor, summaries: torch.Tensor, chunks: list, top_k: int,
                      per_kv_head: bool, *, layer: int) -> list[torch.Tensor] | None:
        """Every query chunk's selection of one forward in one pass, where a policy can do that faster than chunk by
        chunk: queries [B, Hq, q, D] pre-RoPE, summaries [B, Hkv, n, c, D] of all spans sealed by the forward's end,
        chunks (kvtier.prefill.QueryChunk) -> each chunk's select_at result, chosen among its first `chunk.spans` spans
        at its `chunk.tokens`; or None: select chunk by chunk (the default)."""
        return None

    def reset(self, layer: int) -> None:
        """Forget what earlier calls left behind for `layer` (it was reset); stateless policies have nothing to forget."""

    def keep_rows(self, layer: int, index: torch.Tensor) -> None:
        """Row i of what this policy keeps for `layer` becomes old row index[i], index [B'] int64 (any order, repeats
        allowed): the cache reordered, repeated or selected its rows between forwards (beam search); stateless
        policies have nothing to reorder."""

    def layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        """What this policy keeps for `layer` between forwards, saved with the cache so a loaded cache continues as the
        saved one would (names -> tensors); stateless policies keep nothing."""
        return {}

    def restore_layer_state(self, layer: int, state: dict[str, torch.Tensor]) -> None:
        """Take back what `layer_state` gave (tensors on the layer's device)."""

    # ---- decode steps that reuse the last selection (kvtier.fast_decode) ----------------------------------------
    def reuses_selection(self, layer: int) -> bool:
        """Whether `layer`'s next decode step would keep its last selection (then the step may run statically, the
        same kernels on the same buffers, and be replayed from a CUDA graph). Policies that select anew at every step
        say False."""
        return False

    def reused_query_slot(self, layer: int) -> int:
        """Where in this policy's own buffers such a step records its query (0 where it records none)."""
        return 0

    def reuse_selection(self, layer: int, query: torch.Tensor, slot: torch.Tensor) -> None:
        """The device side of such a step: query [B, Hq, 1, D] pre-RoPE, recorded at `slot` ([1] on the device, as
        reused_query_slot gave it) where the policy keeps queries; it launches the same kernels at every step."""

    def selection_reused(self, layer: int) -> None:
        """The host side of such a step, after it ran: what the policy counts (steps until it selects again)."""

    def aggregate(self, grouped: torch.Tensor, summaries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """grouped queries [B, Hkv, g, q, D] fp32, summaries [B, Hkv, n, c, D] fp32 -> (primary, secondary)
        [B, Hkv, n] fp32: each KV head's ranking key of every span under `aggregation`, and its tie-break (the span's
        best candidate score). Scores `query_block` queries at a time."""
        batch, hkv, _, n_queries, _ = grouped.shape
        n_spans = summaries.shape[2]
        primary = torch.zeros(batch, hkv, n_spans, dtype=torch.float32, device=grouped.device)
        best = torch.full_like(primary, float("-inf"))
        for start in range(0, n_queries, self.query_block):
            scores = self.candidate_scores(grouped[:, :, :, start : start + self.query_block], summaries)
            per_span = scores.amax(-1)  # [B, Hkv, g, qb, n]
            best = torch.maximum(best, per_span.amax(dim=(2, 3)))
            if self.aggregation == "vote":
                flat = scores.flatten(-2)  # [B, Hkv, g, qb, n*m]
                picks = flat.topk(min(self.votes, flat.shape[-1]), dim=-1).indices // scores.shape[-1]
                primary.scatter_add_(-1, picks.flatten(2), torch.ones_like(picks.flatten(2), dtype=torch.float32))
            elif self.aggregation == "sum":
                primary += per_span.sum(dim=(2, 3))
        if self.aggregation == "max":
            primary = best
        return primary, best


def dot_scores(queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
    """candidate_scores for summaries whose every vector is a candidate: queries [B, Hkv, g, q, D] . summaries
    [B, Hkv, n, c, D] -> [B, Hkv, g, q, n, c] (the `mean`, `infllm` and `reattention` score)."""
    return torch.einsum("bkgqd,bkncd->bkgqnc", queries, summaries)


def rank_spans(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """primary, secondary [..., n] -> span ids [..., n] int64 ordered by primary desc, then secondary desc, then
    id asc (stable sorts): the order every policy selects in."""
    by_secondary = secondary.argsort(dim=-1, descending=True, stable=True)
    by_primary = primary.gather(-1, by_secondary).argsort(dim=-1, descending=True, stable=True)
    return by_secondary.gather(-1, by_primary)


LAYOUTS = ("text", "best_last")


def best_spans(primary: torch.Tensor, secondary: torch.Tensor, k: int, merge_heads: str | None = None,
               layout: str = "text", keep_first: bool = False) -> torch.Tensor:
    """primary, secondary [B, H, n] -> the first min(k, n) ids of rank_spans' order, laid out as `layout` says:
    [B, Hsel, k] int64. merge_heads None: one selection per head (Hsel = H); "sum" / "max": one for all heads
    (Hsel = 1), ranked by primary summed / maxed over the heads, ties by secondary maxed. Layouts (the order the spans
    take in the scope): "text", ascending; "best_last", see best_run_last. keep_first: span 0 is always chosen; where
    its rank leaves it out it comes in ranked best and the last pick goes (so best-last lays it out next to the local
    window, as kvtier.tools.diagnose's oracle lays out the spans it forces in)."""
    if merge_heads is not None:
        primary = primary.sum(1, keepdim=True) if merge_heads == "sum" else primary.amax(1, keepdim=True)
        secondary = secondary.amax(1, keepdim=True)
    ranked = rank_spans(primary, secondary)[..., :k]  # [..., k] best first
    if keep_first and ranked.shape[-1] > 0:
        chosen = (ranked == 0).any(-1, keepdim=True)  # [..., 1]
        brought = torch.cat((torch.zeros_like(ranked[..., :1]), ranked[..., :-1]), dim=-1)  # [..., k] span 0 best
        ranked = torch.where(chosen, ranked, brought)
    return best_run_last(ranked) if layout == "best_last" else ranked.sort(dim=-1).values


def best_run_last(ranked: torch.Tensor) -> torch.Tensor:
    """ranked [..., k] span ids, best first -> the same ids [..., k] in runs of consecutive ids (each run in text
    order, so a sentence cut by a span border reads whole), the runs ordered by their best span's rank, worst first:
    the best run ends next to the local window, i.e. nearest the question."""
    ids, order = ranked.sort(dim=-1)  # [..., k] ascending; order: each id's rank
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[..., 1:] = ids[..., 1:] != ids[..., :-1] + 1
    run = starts.long().cumsum(-1) - 1  # [..., k] each id's run, 0-based in text order
    best_rank = torch.full_like(ids, ids.shape[-1]).scatter_reduce(-1, run, order, "amin")  # [..., k] per run
    worst_first = best_rank.gather(-1, run).argsort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, worst_first)


def _defined_at(mro: tuple[type, ...], attribute: str) -> int:
    """The position in `mro` of the class whose own body defines `attribute` (len(mro) where none does)."""
    return next((at for at, cls in enumerate(mro) if attribute in vars(cls)), len(mro))
