"""ReAttentionLayer: one model layer's KV (all rows of the batch): takes new tokens in, seals spans as they leave the
local window, selects spans for a query chunk, and gathers the scope `[global | selected spans | local]`."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from transformers.cache_utils import CacheLayerMixin

from kvtier import dispatch
from kvtier.buffers import upload
from kvtier.config import ReAttentionConfig
from kvtier.fast_decode import FastScope, fast_attention
from kvtier.policies import Policy
from kvtier.prefill import QueryChunk, padded_index, plan_chunks
from kvtier.regions import GlobalRegion, LocalWindow, SpanTable, spans_to_seal
from kvtier.rotary import ScopeRotary
from kvtier.tiers.placement import Placement

# (span shape (2, Hkv, S, D), dtype, device, spans one step may need) -> the cache's placement, shared by its layers
PlacementSource = Callable[[tuple[int, ...], torch.dtype, torch.device, int], Placement]


def row_index(indices: torch.Tensor | list[int], batch: int) -> torch.Tensor:
    """Row numbers to keep of a batch of `batch` (a sequence or 1-D tensor of ints) -> index [B'] int64; ValueError for
    anything else or a row out of range."""
    index = torch.as_tensor(indices)
    integers = index.dim() == 1 and not index.is_floating_point() and index.dtype != torch.bool
    if not integers or ((index < 0) | (index >= batch)).any():
        raise ValueError(
            f"batch_select_indices takes row numbers 0..{batch - 1} (a list or 1-D integer tensor), got {indices!r}"
        )
    return index.long()


def tokens_to_crop(max_length, held: int) -> int:
    """Cache.crop's argument -> the count of newest tokens to remove from `held`: max_length <= 0 removes -max_length,
    > 0 keeps max_length (transformers 5.17's deprecated meaning; it passes a 0-d tensor)."""
    max_length = int(max_length)
    return held - max_length if max_length > 0 else -max_length


class GrowingLayer(CacheLayerMixin):
    """transformers' length protocol for a layer that counts the tokens fed in `seen` and has no fixed size."""

    is_compileable = False
    is_sliding = False
    seen = 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older releases pass cache_position
            query_length = query_length.shape[0]
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1


class ReAttentionLayer(GrowingLayer):
    is_croppable = True  # within the local window (see crop); transformers' assisted generation asks the cache

    def __init__(self, config: ReAttentionConfig, policy: Policy, placement_source: PlacementSource, index: int = 0):
        super().__init__()
        self.index = index  # the model layer this is: policies that vote across layers tell them apart by it
        self.config = config
        self.policy = policy
        self.placement_source = placement_source
        self.seen = 0  # tokens fed to this layer (absolute)
        self.largest_scope = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.keeps_fast_scope = False  # set by a cache that decodes statically (kvtier.graphs)
        # a forward of several query chunks is taken in at once (kvtier.prefill); False: chunk by chunk, each chunk's
        # selection through `select` with the layer as it stands at that chunk (kvtier.tools.diagnose wraps it)
        self.batches_forwards = True
        self.fast: FastScope | None = None  # the last decode step's scope, kept for the next static step

    # ---- transformers' layer protocol ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        dtype, device = key_states.dtype, key_states.device
        cfg = self.config
        self.dtype, self.device = dtype, device
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.global_region = GlobalRegion(batch, kv_heads, cfg.global_size, head_dim, dtype, device)
        self.local = LocalWindow(batch, kv_heads, cfg.local_limit, cfg.chunk_size, head_dim, dtype, device)
        self.table = SpanTable(batch, kv_heads, self.policy.summary_size(cfg.span_size), head_dim, dtype, device)
        selected = cfg.top_k * (kv_heads if cfg.per_kv_head else 1)
        step_spans = batch * (selected + -(-cfg.chunk_size // cfg.span_size) + cfg.seal_group - 1)
        self.placement = self.placement_source((2, kv_heads, cfg.span_size, head_dim), dtype, device, step_spans)
        self.use_kernels = dispatch.kernels_enabled(cfg, device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stash the new pre-RoPE K/V [B, Hkv, q, D] for this forward's attention call, which takes them in chunk by
        chunk (so that each query chunk selects among the spans sealed before it). Returns them unchanged."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.batch:
            raise ValueError(
                f"this ReAttentionCache holds {self.batch} sequences but got a batch of {key_states.shape[0]}. To "
                "change the batch of a cache that holds tokens, call cache.batch_repeat_interleave(n) first (e.g. "
                "before generate with num_beams=n or num_return_sequences=n on it) or "
                "cache.batch_select_indices(rows); otherwise use a new cache for a new batch"
            )
        if self._pending is not None:
            raise RuntimeError("ReAttentionLayer.update was called twice without an attention call in between")
        self._pending = (key_states, value_states)
        self.seen += key_states.shape[2]
        return key_states, value_states

    def restore(self, state: dict[str, torch.Tensor], uids: torch.Tensor, seen: int, largest_scope: int) -> None:
        """Rebuild from a saved cache: state holds global_keys/values, local_keys/values [B, Hkv, *, D] and
        summaries [B, Hkv, n, c, D] on this layer's device; uids [B, n] name the spans in the placement."""
        self.lazy_initialization(state["global_keys"], state["global_values"])
        self.global_region.absorb(state["global_keys"], state["global_values"])
        self.local.append(state["local_keys"], state["local_values"])
        self.table.append(uids, state["summaries"])
        self.seen, self.largest_scope = seen, largest_scope

    def reset(self) -> None:
        self.policy.reset(self.index)
        keeps_fast_scope, batches_forwards = self.keeps_fast_scope, self.batches_forwards
        self.__init__(self.config, self.policy, self.placement_source, self.index)
        self.keeps_fast_scope, self.batches_forwards = keeps_fast_scope, batches_forwards

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search's step: row i continues old row beam_idx[i] [B] (see keep_rows)."""
        self.keep_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row `repeats` times in a row: rows [a, b] -> [a, a, b, b] for repeats=2 (see keep_rows)."""
        if self.is_initialized:
            self.keep_rows(torch.arange(self.batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor | list[int]) -> None:
        """Keep the rows numbered `indices` [B'] (any order, repeats allowed; see keep_rows)."""
        if self.is_initialized:
            self.keep_rows(row_index(indices, self.batch))

    def keep_rows(self, index: torch.Tensor) -> None:
        """Make row i old row index[i], index [B'] int64 (any order, repeats allowed), in every per-row tensor: the
        global region, the local window, the span table (uids, on the device and the host, and summaries) and the
        policy's state for this layer. Spans are never copied: they live in the shared placement under their uid and
        never change once sealed, so rows that descend from one row share its spans by uid; only the uid tables are
        gathered. Costs a copy of the kept rows' global and local tokens and summaries (the policy's `summary_size`
        vectors per span: for `reattention` and `consensus` these are the span's keys, so about half of the rows' KV).
        Spans that only dropped rows named stay in their tiers, unused (the least recently selected: the first to move
        down when a budget is tight), until the cache is closed."""
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self.global_region.keep_rows(index)
        self.local.keep_rows(index)
        self.table.keep_rows(index)
        self.policy.keep_rows(self.index, index)
        self.batch = index.shape[0]
        self.fast = None

    def crop(self, max_length: int) -> None:
        """Remove the newest tokens: max_length <= 0 removes -max_length of them (what assisted generation does with a
        rejected draft), > 0 keeps the first max_length (the older, deprecated meaning transformers 5.17 still
        accepts; nothing happens when the layer holds no more). Only tokens of the local window can go, and those of
        the global region while no span is sealed: a crop reaching into sealed spans (removing more tokens than the
        local window holds) raises ValueError and changes nothing.
        Sealing is not undone: spans sealed while the removed tokens were in the window stay sealed, so the window may
        hold fewer than local_size tokens until new ones fill it; nor is the policy's state (consensus's observation
        window keeps the removed tokens' queries until newer ones overwrite them)."""
        count = tokens_to_crop(max_length, self.seen)
        if count <= 0 or not self.is_initialized:
            return
        self.check_removable(count)
        if self.fast is not None:
            self.fast.current = False
        from_local = min(count, self.local.length)
        self.local.drop_newest(from_local)
        self.global_region.drop_newest(count - from_local)
        self.seen -= count

    def check_removable(self, count: int) -> None:
        """ValueError naming the limit unless `crop` can remove the newest `count` tokens (see crop)."""
        if count > self.seen:
            raise ValueError(f"cannot remove {count} tokens: this ReAttentionCache holds {self.seen}")
        from_local = min(count, self.local.length)
        if count > from_local and len(self.table):
            safe = self.config.local_size - self.config.span_size + 1
            raise ValueError(
                f"cannot remove the newest {count} tokens of this ReAttentionCache: only the {from_local} newest are "
                f"still in its local window, the older ones are sealed into spans, which a crop never reaches into. "
                f"Remove at most {from_local}; the tokens of the last forward always can be when it brought at most "
                f"local_size - span_size + 1 = {safe}"
            )

    # ---- what the attention call uses ---------------------------------------------------------------------------
    def take_pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pending is None:
            raise RuntimeError("the attention call found no new tokens: ReAttentionCache.update was not called first")
        pending, self._pending = self._pending, None
        return pending

    def discard_pending(self) -> None:
        self._pending = None

    def ingest(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append one chunk's K/V [B, Hkv, c, D]; seal the oldest local tokens in whole spans, seal_group at a time
        (kvtier.regions.spans_to_seal: the local window keeps between local_size - span_size + 1 and local_limit
        tokens)."""
        taken = self.global_region.absorb(keys, values)
        if taken == keys.shape[2]:
            return
        self.local.append(keys[:, :, taken:], values[:, :, taken:])
        cfg = self.config
        count = spans_to_seal(len(self.table), self.local.length, cfg.local_size, cfg.span_size, cfg.seal_group)
        if count:
            self._seal_tokens(*self.local.pop_front(count * cfg.span_size))

    def _seal_tokens(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Seal keys / values [B, Hkv, count*S, D], the oldest tokens after the last sealed span, as count spans."""
        span = self.config.span_size
        batch, kv_heads, head_dim = self.batch, self.kv_heads, self.head_dim
        count = keys.shape[2] // span
        keys = keys.reshape(batch, kv_heads, count, span, head_dim).transpose(1, 2)  # [B, count, Hkv, S, D]
        values = values.reshape(batch, kv_heads, count, span, head_dim).transpose(1, 2)
        spans = torch.stack((keys, values), dim=2).flatten(0, 1)  # [B*count, 2, Hkv, S, D], span-major
        summaries = dispatch.summarise(self.policy, spans[:, 0], self.use_kernels)  # [B*count, Hkv, c, D]
        summaries = summaries.view(batch, count, *summaries.shape[1:]).transpose(1, 2)  # [B, Hkv, count, c, D]
        uids = torch.from_numpy(self.placement.add(spans)).view(batch, count)
        self.table.append(uids, summaries)

    def plan_forward(self, bounds: list[tuple[int, int]]) -> tuple[list[QueryChunk], int] | None:
        """The query chunks at `bounds` of this forward (kvtier.prefill.plan_chunks) with the stream tokens they seal,
        or None: chunk by chunk (while the global region is not full, its first tokens go there; or not
        batches_forwards)."""
        if not self.batches_forwards or self.global_region.length < self.config.global_size or len(bounds) < 2:
            return None
        cfg = self.config
        return plan_chunks(bounds, self.local.length, len(self.table), self.global_region.length, cfg.local_size,
                           cfg.span_size, cfg.seal_group)

    def ingest_forward(self, keys: torch.Tensor, values: torch.Tensor,
                       sealed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Take a whole forward's K/V [B, Hkv, q, D] in at once (the global region full): seal the first `sealed`
        tokens of the stream `[local window | keys]` as spans and keep the rest as the local window -> the stream
        (keys, values [B, Hkv, local + q, D]) that plan_forward's chunks cut their local windows from."""
        old_keys, old_values = self.local.view()
        stream = torch.cat((old_keys, keys), 2), torch.cat((old_values, values), 2)  # [B, Hkv, local + q, D]
        cfg = self.config
        # a bounded GPU pool takes at most one chunk's spans per add (as chunk by chunk), an unbounded one all at once
        step = sealed if self.placement.gpu.capacity is None else -(-cfg.chunk_size // cfg.span_size) * cfg.span_size
        for start in range(0, sealed, max(step, 1)):
            end = min(start + step, sealed)
            self._seal_tokens(stream[0][:, :, start:end], stream[1][:, :, start:end])
        self.local.replace(stream[0][:, :, sealed:], stream[1][:, :, sealed:])
        return stream

    def select_chunks(self, queries: torch.Tensor, chunks: list[QueryChunk]) -> list[torch.Tensor]:
        """queries [B, Hq, q, D] pre-RoPE of a forward ingested whole -> each chunk's span ids [B, Hkv, k] in scope
        order, chosen among the spans sealed before it, as `select` would have chosen them chunk by chunk."""
        chosen = dispatch.select_chunks(self.policy, queries, self.table.summaries.view(), chunks, self.config,
                                        self.use_kernels, self.index)
        expanded = {}  # chunks sharing a selection (one tensor) keep sharing it: gather_chunk_scopes reads it once
        return [expanded.setdefault(id(ids), ids.expand(-1, self.kv_heads, -1)) for ids in chosen]

    def select(self, queries: torch.Tensor) -> torch.Tensor:
        """queries [B, Hq, c, D] pre-RoPE -> span ids [B, Hkv, k] in scope order (the same ids for every head
        unless per_kv_head)."""
        ids = dispatch.select(self.policy, queries, self.table.summaries.view(), self.config, self.use_kernels,
                              self.index, self.tokens_held())
        return ids.expand(-1, self.kv_heads, -1)

    def tokens_held(self) -> int:
        """Tokens taken in so far, up to the end of the query chunk being attended (the same for every layer)."""
        return self.global_region.length + len(self.table) * self.config.span_size + self.local.length

    def gather_scope(self, ids: torch.Tensor, rotary: ScopeRotary,
                     local_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, Hkv, k] -> scope keys (rotated at positions 0..L-1), values [B, Hkv, L, D]: `[global | selected
        spans, in the order of ids | local window]`, L = g + k*S + local. `local_kv`: the local window's
        keys / values [B, Hkv, local, D] when not the layer's own (a chunk of a forward ingested whole)."""
        batch, kv_heads, head_dim = self.batch, self.kv_heads, self.head_dim
        global_kv, local_kv = self.global_region.view(), local_kv or self.local.view()
        n_global, n_local, n_sel = global_kv[0].shape[2], local_kv[0].shape[2], ids.shape[-1] * self.config.span_size
        length = n_global + n_sel + n_local
        self.largest_scope = max(self.largest_scope, length)
        keys = torch.empty(batch, kv_heads, length, head_dim, dtype=self.dtype, device=self.device)  # [B, Hkv, L, D]
        values = torch.empty_like(keys)
        if self.use_kernels:
            loc = self._locate(ids)  # first: locating may promote spans into a grown pool
            pool, host_blocks = self.placement.gather_sources()
            dispatch.scope_gather(global_kv, local_kv, pool, host_blocks, loc, rotary, keys, values)
            self.placement.host_reads_launched()
            return keys, values
        keys[:, :, :n_global], values[:, :, :n_global] = global_kv
        if n_sel:
            spans = self._fetch(ids)  # [B, Hkv, k, 2, S, D]
            keys[:, :, n_global : n_global + n_sel] = spans[:, :, :, 0].flatten(2, 3)
            values[:, :, n_global : n_global + n_sel] = spans[:, :, :, 1].flatten(2, 3)
        keys[:, :, n_global + n_sel :], values[:, :, n_global + n_sel :] = local_kv
        return rotary.rotate(keys, 0), values

    def gathers_chunks_at_once(self) -> bool:
        """Whether gather_chunk_scopes may build several chunks' scopes in one go: every span is read where it lies
        (the device table or an unbounded GPU pool), so no chunk's spans need room made for them."""
        return self.placement.locates_on_device if self.use_kernels else self.placement.slot_is_uid

    def gather_chunk_scopes(self, chosen: list[torch.Tensor], chunks: list[QueryChunk],
                            stream: tuple[torch.Tensor, torch.Tensor],
                            rotary: ScopeRotary) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The scopes of several chunks of a forward taken in at once (gathers_chunks_at_once): chosen, each chunk's
        span ids [B, Hkv, k]; stream, the forward's `[local window | new tokens]` their local windows are cut from ->
        keys (rotated at 0..L_j-1), values [B*m, Hkv, Lmax, D] (row b*m + j: chunk j of row b; the positions past L_j
        hold copies of its last local token, to be masked) and each chunk's L_j."""
        batch, kv_heads, head_dim, m = self.batch, self.kv_heads, self.head_dim, len(chunks)
        # consecutive chunks sharing one selection (a policy's reused one, e.g. consensus' stride) read its spans once
        runs = [start for start in range(m) if start == 0 or chosen[start] is not chosen[start - 1]]
        n_spans = chosen[0].shape[-1] * self.config.span_size
        head = self.global_region.length + n_spans  # global and spans: the same positions in every chunk's scope
        local_lengths = [chunk.local.stop - chunk.local.start for chunk in chunks]
        longest = max(local_lengths)
        self.largest_scope = max(self.largest_scope, head + longest)
        keys = torch.empty(batch * m, kv_heads, head + longest, head_dim, dtype=self.dtype, device=self.device)
        values = torch.empty_like(keys)
        if len(runs) == m:
            self._gather_heads(chosen, rotary, keys[:, :, :head], values[:, :, :head])
        else:
            shared = torch.empty(batch * len(runs), kv_heads, head, head_dim, dtype=self.dtype, device=self.device)
            shared_values = torch.empty_like(shared)  # [B*u, Hkv, head, D]: one row per run of chunks
            self._gather_heads([chosen[start] for start in runs], rotary, shared, shared_values)
            for source, target in ((shared, keys), (shared_values, values)):  # each run's rows: one broadcast copy
                per_run, per_chunk = source.unflatten(0, (batch, -1)), target.unflatten(0, (batch, m))
                for at, (start, end) in enumerate(zip(runs, [*runs[1:], m])):
                    per_chunk[:, start:end, :, :head] = per_run[:, at : at + 1]
        index = padded_index(tuple((chunk.local.start, chunk.local.stop) for chunk in chunks), longest, self.device)
        local_keys, local_values = (part.index_select(2, index).unflatten(2, (m, longest)).transpose(1, 2)
                                    .flatten(0, 1) for part in stream)  # [B*m, Hkv, longest, D]
        keys[:, :, head:] = dispatch.rotate(rotary, local_keys, head, self.use_kernels)
        values[:, :, head:] = local_values
        return keys, values, [head + length for length in local_lengths]

    def _gather_heads(self, chosen: list[torch.Tensor], rotary: ScopeRotary, keys: torch.Tensor,
                      values: torch.Tensor) -> None:
        """`[global | spans]` of each selection of `chosen` (m of [B, Hkv, k]) into keys (rotated at 0..), values
        [B*m, Hkv, G + k*S, D] (row b*m + j: selection j of row b)."""
        m = len(chosen)
        global_kv = tuple(part.repeat_interleave(m, dim=0) for part in self.global_region.view())  # [B*m, Hkv, G, D]
        spans_of_rows = torch.stack(chosen, dim=2).flatten(2)  # [B, Hkv, m*k]: one selection of every chunk's spans
        if self.use_kernels:
            loc = self._locate(spans_of_rows).unflatten(2, (m, -1)).transpose(1, 2).flatten(0, 1)  # [B*m, Hkv, k]
            pool, host_blocks = self.placement.gather_sources()
            no_local = (global_kv[0][:, :, :0], global_kv[1][:, :, :0])
            dispatch.scope_gather(global_kv, no_local, pool, host_blocks, loc, rotary, keys, values)
            self.placement.host_reads_launched()
            return
        spans = self._fetch(spans_of_rows).unflatten(2, (m, -1)).transpose(1, 2).flatten(0, 1)
        # spans [B*m, Hkv, k, 2, S, D]
        keys.copy_(rotary.rotate(torch.cat((global_kv[0], spans[:, :, :, 0].flatten(2, 3)), 2), 0))
        values.copy_(torch.cat((global_kv[1], spans[:, :, :, 1].flatten(2, 3)), 2))

    def _selected_uids(self, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """ids [B, Hkv, k] -> (the distinct uids selected [U], the index of each id's uid in them [B, Hkv, k])."""
        rows = torch.arange(ids.shape[0])[:, None, None]
        uids = self.table.uids_host.view()[rows, ids.cpu()].numpy()  # [B, Hkv, k]
        distinct, inverse = np.unique(uids, return_inverse=True)
        return distinct, inverse.reshape(uids.shape)

    def _uids_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, Hkv, k] -> (the uids of those spans [B, Hkv, k], on the device; the same uids once per selection:
        all of them per KV head, else [B, 1, k], as every head shares the selection)."""
        uids = self.table.uids.view()[:, None, :].expand(-1, self.kv_heads, -1).gather(2, ids)
        return uids, uids if self.config.per_kv_head else uids[:, :1]

    def _locate(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, Hkv, k] -> loc [B, Hkv, k] on the device for the gather kernel (GPU slot, or -1 - host slot)."""
        if self.placement.locates_on_device:  # no round trip to the CPU
            return self.placement.device_locations(*self._uids_of(ids))
        distinct, inverse = self._selected_uids(ids)
        return upload(self.placement.locate(distinct)[inverse], self.device)

    def _fetch(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, Hkv, k] -> the spans [B, Hkv, k, 2, S, D], each row and KV head reading its own head. With every
        span in the GPU pool at slot == uid this is one indexing op on the device; otherwise the placement brings the
        distinct selected spans up in one batch."""
        if self.placement.slot_is_uid:
            return self.placement.pool_heads(*self._uids_of(ids))
        distinct, inverse = self._selected_uids(ids)
        spans = self.placement.fetch(distinct).to(self.device)  # [U, 2, Hkv, S, D]
        heads = torch.arange(self.kv_heads, device=self.device)[None, :, None]
        return spans[upload(inverse, self.device), :, heads]

    # ---- the static decode step (kvtier.fast_decode; kvtier.graphs captures it) -----------------------------------
    def scope_attended(self, keys: torch.Tensor, values: torch.Tensor, n_queries: int) -> None:
        """An eager attention call attended this scope (rotated keys, values [B, Hkv, L, D]) with n_queries queries:
        a decode step's is kept for the next static step, a prefill chunk's is not."""
        if not self.keeps_fast_scope:
            return
        if n_queries > 1:
            if self.fast is not None:
                self.fast.current = False
            return
        if self.fast is None:
            self.fast = FastScope(self.batch, self.kv_heads, self.config.scope_bound, self.head_dim, self.dtype,
                                  self.device)
        self.fast.keep(keys, values)

    def fast_step_ready(self) -> bool:
        """Whether the next decode step can be static: the kept scope is current, the token seals no span, moves no
        buffer and goes to the local window (the global region is full), and the policy reuses its selection."""
        fast, local = self.fast, self.local
        return (fast is not None and fast.current and fast.length < fast.keys.shape[2]
                and self.global_region.length == self.config.global_size
                and local.length < self.config.local_limit and local.start + local.length < local.keys.shape[2]
                and self.policy.reuses_selection(self.index))

    def fast_slots(self) -> tuple[int, int, int]:
        """Where the static step writes: (local window slot, scope position, the policy's query slot)."""
        return self.local.start + self.local.length, self.fast.length, self.policy.reused_query_slot(self.index)

    def fast_attend(self, rotary: ScopeRotary, query: torch.Tensor, slots: tuple[torch.Tensor, ...],
                    scaling: float | None) -> torch.Tensor:
        """The static step (see kvtier.fast_decode): query [B, Hq, 1, D] pre-RoPE, slots as fast_slots gives them,
        each a [1] tensor on the device -> [B, 1, Hq, D]."""
        keys, values = self.take_pending()
        out = fast_attention(self.fast, self.local.keys, self.local.values, rotary, query, keys, values, slots[:2],
                             scaling, self.use_kernels)
        self.policy.reuse_selection(self.index, query, slots[2])
        return out

    def fast_step_done(self) -> None:
        """The host's account of a static step that ran (or replayed): one token more in the window and the scope."""
        self.local.length += 1
        self.fast.length += 1
        self.largest_scope = max(self.largest_scope, self.fast.length)
        self.policy.selection_reused(self.index)

    # ---- accounting ---------------------------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Bytes this layer keeps on the device outside the span pool: global, local window, span table, kept scope."""
        if not self.is_initialized:
            return 0
        regions = (self.global_region.keys, self.global_region.values, self.local.keys, self.local.values)
        regions += () if self.fast is None else (self.fast.keys, self.fast.values)
        return sum(t.numel() * t.element_size() for t in regions) + self.table.nbytes
