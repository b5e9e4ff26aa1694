"""ReAttentionCache: a transformers Cache that keeps all KV but shows each attention call a finite scope."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvtier import hf
from kvtier.attention import scope_attention
from kvtier.buffers import GrowableTensor
from kvtier.config import ReAttentionConfig
from kvtier.graphs import DecodeGraphs
from kvtier.layer import ReAttentionLayer, row_index
from kvtier.padding import Padding
from kvtier.parallel import HeadShards
from kvtier.persist import fingerprint, load_cache, save_cache
from kvtier.policies import Policy, build_policy
from kvtier.rotary import ScopeRotary
from kvtier.rows import PaddedLayer, RowStream, follow_rows
from kvtier.sharing import SharedRows
from kvtier.tiers.placement import Placement, SharedPlacement


class ReAttentionCache(hf.HostedCache):
    """Drop-in cache for `model.generate(ids, past_key_values=ReAttentionCache(model), max_new_tokens=...)`.

    `config` is a ReAttentionConfig, a dict of its fields, or a .yaml/.json path; keyword overrides win over it.
    Fields left unset are derived from the model's trained window. Binding switches the model's attention to
    kvtier's, which computes exactly what stock SDPA does for any other cache.
    """

    def __init__(self, model, config: ReAttentionConfig | dict | str | Path | None = None, **overrides: Any):
        if isinstance(config, dict):
            config = ReAttentionConfig.from_dict(config)
        elif isinstance(config, (str, Path)):
            config = ReAttentionConfig.from_file(config)
        elif config is None:
            config = ReAttentionConfig()
        elif not isinstance(config, ReAttentionConfig):
            raise ValueError(f"config must be a ReAttentionConfig, a dict or a .yaml/.json path, got {type(config).__name__}")
        spec = hf.bind_model(model)
        self.config = config.replace(**overrides).resolve(spec.window)
        group = hf.tensor_parallel_group(model)
        self._shards = None if group is None else HeadShards(group)  # tensor parallelism: this rank's heads
        self.spec = spec
        self.policy = self._new_policy()
        self.model_fingerprint = fingerprint(model)  # checked against the model a saved cache is loaded into
        self._rotary: dict[torch.device, ScopeRotary] = {}
        # one placement per device the layers' K/V live on, made on its first K/V (it needs their shape)
        self._placement = SharedPlacement(self.config, hf.layer_device_shares(model))
        self._tokens: GrowableTensor | None = None  # [B, T] the token ids fed, while they are known
        self._tokens_known = True
        self._padding = Padding()
        self._new_pads: list[int] = []  # [B] pads among the current forward's new tokens, per row
        self._rows: list[RowStream] = []  # a padded batch's rows (PaddedLayer reads them), empty otherwise
        self._shared: SharedRows | None = None  # identical rows held once (kvtier.sharing), until their inputs differ
        self._graphs: DecodeGraphs | None = None  # the static decode path, made on the first forward (kvtier.graphs)
        super().__init__(layers=self._batched_layers())

    def _new_policy(self) -> Policy:
        """The config's policy, seeing every rank's heads under tensor parallelism (kvtier.parallel)."""
        policy = build_policy(self.config.policy, self.config.policy_options)
        policy.head_shards = self._shards
        policy.num_layers = self.spec.num_layers
        return policy

    def _batched_layers(self) -> list[ReAttentionLayer]:
        return [ReAttentionLayer(self.config, self.policy, self._placement, index) for index in range(self.spec.num_layers)]

    def decode_statically(self, capture: bool) -> None:
        """Take the static path for the decode steps that allow it (kvtier.graphs), captured in a CUDA graph when
        `capture`; a cache with decode_graphs="auto" does this on CUDA by itself."""
        self._graphs = DecodeGraphs(self, capture)
        for layer in self.layers:
            layer.keeps_fast_scope = True

    def fast_decode_ready(self) -> bool:
        """Whether the next decode step can take the static path in every layer (an unpadded batch, rows not held
        once, every layer's token adding only itself to its scope)."""
        return not self._rows and self._shared is None and all(layer.fast_step_ready() for layer in self.layers)

    def run_decoder(self, forward, kwargs):
        # not captured under tensor parallelism or over several devices yet: untested there
        auto = (self.config.decode_graphs == "auto" and self.policy.keeps_selection and torch.cuda.is_available()
                and self._shards is None and len(self._placement.shares) <= 1)
        if self._graphs is None and auto:
            device = next((value.device for value in kwargs.values() if isinstance(value, torch.Tensor)), None)
            if device is not None and device.type == "cuda":
                self.decode_statically(capture=True)
        if self._graphs is not None and self._graphs.ready(kwargs):
            return self._graphs.run(forward, kwargs)
        return forward(**kwargs)

    @property
    def placement(self) -> Placement | None:
        """Where the spans of every layer live (None until the first forward); for a model whose layers are on several
        devices (device_map), the first device's: `placements` has each one."""
        return self._placement.placement

    @property
    def placements(self) -> list[Placement]:
        """One placement per device the layers' K/V live on (a model on one device has one)."""
        return list(self._placement.placements.values())

    def begin_forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Called by the decoder hook before each forward, with its input ids [B, q] (None when embeddings were passed)
        and 2-D attention mask [B, held + q] (or None). Checks the mask (left padding only) before anything changes;
        the first forward of a left-padded batch switches the cache to row-by-row streams (kvtier.rows)."""
        held = self.get_seq_length()
        new = input_ids.shape[-1] if input_ids is not None else (attention_mask.shape[-1] - held if attention_mask is not None else 0)
        if input_ids is not None:
            self._check_batch(input_ids.shape[0])
        self._new_pads = self._padding.plan(attention_mask, held, new)
        if held == 0 and self._padding.padded and not self._rows:
            self._start_rows(len(self._new_pads))
        if self._shared is not None and not self._shared.still_holds(input_ids):
            self._unshare()
        if held == 0 and not self._rows:
            self._shared = SharedRows.of(input_ids)
        self.record_tokens(input_ids)

    def _unshare(self) -> None:
        """Give every row its own state again, if identical rows are held once (their spans stay shared by uid)."""
        if self._shared is not None:
            for layer in self.layers:
                layer.keep_rows(self._shared.rows)
            self._shared = None
            if self._graphs is not None:
                self._graphs.drop()

    def _start_rows(self, count: int) -> None:
        self._rows[:] = [RowStream.new(self.config, self._new_policy(),
                                       self._placement, self.spec.num_layers) for _ in range(count)]
        self.layers = [PaddedLayer(self._rows, index) for index in range(self.spec.num_layers)]

    @property
    def padded(self) -> bool:
        """Whether this cache holds a left-padded batch (its rows run one by one in the attention)."""
        return bool(self._rows)

    @property
    def pads(self) -> list[int]:
        """Each row's leading pads (all 0 for an unpadded batch; empty before the first forward)."""
        return [] if self._padding.pads is None else self._padding.pads.tolist()

    def streams(self) -> list[tuple[list[ReAttentionLayer], Policy]]:
        """The layers holding K/V, each group with the policy selecting for it: one group for an unpadded batch (its
        layers hold every row), one per row for a padded batch."""
        if self._rows:
            return [(row.layers, row.policy) for row in self._rows]
        return [(self.layers, self.policy)]

    def restore_padding(self, pads: list[int], columns: int) -> None:
        """Take back a saved padded batch's rows (their streams are restored next) and its column count."""
        self._padding.pads = torch.tensor(pads, dtype=torch.long)
        self._start_rows(len(pads))
        for layer in self.layers:
            layer.seen, layer.is_initialized = columns, True

    def reset(self) -> None:
        """Forget every token held (a padded batch's rows too); the next forward starts a new context."""
        if self._rows:
            self._rows.clear()
            self.layers = self._batched_layers()
        self._padding, self._tokens, self._tokens_known, self._shared = Padding(), None, True, None
        super().reset()
        if self._graphs is not None:
            self.decode_statically(self._graphs.capture)

    def _check_batch(self, batch: int) -> None:
        if self._tokens is not None and batch != self._tokens.data.shape[0]:
            raise ValueError(
                f"this ReAttentionCache holds {self._tokens.data.shape[0]} sequences but got a batch of {batch}. To "
                "change the batch of a cache that holds tokens, call cache.batch_repeat_interleave(n) first (e.g. "
                "before generate with num_beams=n or num_return_sequences=n on it) or "
                "cache.batch_select_indices(rows); otherwise use a new cache for a new batch"
            )

    def record_tokens(self, input_ids: torch.Tensor | None) -> None:
        """Keep a forward's input ids [B, q] (None when embeddings were passed: the ids are unknown from then on)."""
        if input_ids is None:
            self._tokens_known = False
            return
        self._check_batch(input_ids.shape[0])
        if self._tokens is None:
            self._tokens = GrowableTensor((input_ids.shape[0], 0), 1, torch.long, torch.device("cpu"))
        self._tokens.append(input_ids.detach().to("cpu", torch.long))

    @property
    def token_ids(self) -> torch.Tensor | None:
        """The token ids this cache holds [B, T] (None if some forward passed embeddings instead of ids): continue a
        saved context with `model.generate(torch.cat([cache.token_ids, more_ids], -1), past_key_values=cache)`."""
        if not self._tokens_known or self._tokens is None:
            return None
        return self._tokens.view().clone()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._shared is not None:
            self.layers[layer_idx].update(self._shared.distinct(key_states), self._shared.distinct(value_states))
        else:
            key_states, value_states = self.layers[layer_idx].update(key_states, value_states)
        hf.publish(self, layer_idx, key_states)
        return key_states, value_states

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """query [B, Hq, q, D] pre-RoPE -> attention output [B, q, Hq, D] over the layer's scope, with the layer's
        device current (Triton launches its kernels on the current device; device_map puts layers on several)."""
        if query.is_cuda and len(self._placement.shares) > 1:
            with torch.cuda.device(query.device):
                return self._attend(layer_idx, query, scaling)
        return self._attend(layer_idx, query, scaling)

    def _attend(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        if self._graphs is not None and self._graphs.active:
            return self.layers[layer_idx].fast_attend(self._rotary_on(query.device), query,
                                                      self._graphs.counters.of(layer_idx), scaling)
        if self._rows:
            return self.layers[layer_idx].attend(self._rotary_on(query.device), query, scaling, self._new_pads)
        if self._shared is not None:
            out = scope_attention(self.layers[layer_idx], self._rotary_on(query.device), self._shared.distinct(query), scaling)
            return self._shared.expand(out)
        return scope_attention(self.layers[layer_idx], self._rotary_on(query.device), query, scaling)

    def _rotary_on(self, device: torch.device) -> ScopeRotary:
        if device not in self._rotary:
            self._rotary[device] = ScopeRotary(
                self.spec.inv_freq, self.spec.attention_scaling, self.config.scope_bound, device
            )
        return self._rotary[device]

    # ---- rows and rollback (beam search, several sequences per prompt, assisted generation) ------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search's step: row i continues old row beam_idx[i] [B]. Spans are shared by uid, never copied (see
        ReAttentionLayer.keep_rows for what is copied and what it costs; a padded batch clones a row's stream)."""
        self._unshare()
        if self._rows:
            follow_rows(self._rows, beam_idx.tolist())
        else:
            super().reorder_cache(beam_idx)
        self._keep_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row `repeats` times in a row ([a, b] -> [a, a, b, b] for 2): what a cache holding a prompt needs before
        generate(..., num_beams=n) or num_return_sequences=n continues it (generate expands its input ids, not the
        cache)."""
        self._unshare()
        index = torch.arange(self._batch_held()).repeat_interleave(repeats)
        if self._rows:
            follow_rows(self._rows, index.tolist())
        else:
            super().batch_repeat_interleave(repeats)
        self._keep_rows(index)

    def batch_select_indices(self, indices: torch.Tensor | list[int]) -> None:
        """Keep the rows numbered `indices` [B'] (any order, repeats allowed)."""
        self._unshare()
        index = row_index(indices, self._batch_held()) if self._batch_held() else torch.as_tensor(indices)
        if self._rows:
            follow_rows(self._rows, index.tolist())
        else:
            super().batch_select_indices(index)
        self._keep_rows(index)

    def _batch_held(self) -> int:
        """Rows this cache holds (0 before the first forward)."""
        if self._rows:
            return len(self._rows)
        return self.layers[0].batch if self.layers[0].is_initialized else 0

    def crop(self, max_length: int) -> None:
        """Remove the newest tokens: max_length <= 0 removes -max_length, > 0 keeps max_length (transformers 5.17's
        deprecated meaning). Only tokens still in the local window can go; see ReAttentionLayer.crop."""
        held = self.get_seq_length()
        super().crop(max_length)
        if self._tokens is not None:
            self._tokens.truncate(self._tokens.length - (held - self.get_seq_length()))

    def _keep_rows(self, index: torch.Tensor) -> None:
        """The cache's own per-row records (token ids, leading pads) follow its layers' rows: index [B']; a captured
        decode graph, whose buffers the layers replaced, is dropped."""
        if self._graphs is not None:
            self._graphs.drop()
        index = index.cpu()
        if self._tokens is not None:
            self._tokens.keep_rows(index)
        if self._padding.pads is not None:
            self._padding.pads = self._padding.pads[index]

    def stats(self) -> dict[str, Any]:
        """A plain dict: tokens fed, the largest rotary position used and scope seen; per tier the spans and bytes
        resident, bytes moved in each direction, selection hits and misses, promotions, evictions and time waited;
        `gpu_fixed_bytes` is what stays on the GPU outside the span pool (global, local window, summaries);
        `decode_graphs` counts the static decode steps and what they keep (kvtier.graphs; None when they are off)."""
        scope = max((layer.largest_scope for layer in self.layers), default=0)
        tiers = self._placement.stats()
        return {
            "tokens": self.get_seq_length(),
            "max_position": scope - 1,
            "scope_tokens": scope,
            "scope_bound": self.config.scope_bound,
            **tiers,
            "gpu_fixed_bytes": sum(layer.resident_bytes() for layer in self.layers),
            "policy": self.config.policy,
            "decode_graphs": None if self._graphs is None else self._graphs.stats(),
        }

    def save(self, path: str | Path) -> None:
        """Write everything needed to continue into one LMDB file at `path`, atomically: an interrupted save
        leaves the previous file (or none), never a partial one."""
        self._unshare()
        save_cache(self, Path(path))

    @classmethod
    def load(cls, path: str | Path, model, **placement: Any) -> "ReAttentionCache":
        """Reopen a saved cache for `model` (checked against the saved fingerprint) and continue without re-running
        the prefill; spans stay in the file until selected. `placement` may set gpu_budget, host_budget,
        disk_path, disk_budget for this session."""
        return load_cache(cls, Path(path), model, placement)

    def close(self) -> None:
        """Wait for background copies, close the LMDB files and delete the spill file. The cache is unusable after."""
        self._placement.close()

    def __repr__(self) -> str:
        return f"ReAttentionCache({self.config}, tokens={self.get_seq_length()})"
