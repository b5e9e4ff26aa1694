"""ReAttentionCache: a transformers Cache that keeps all KV but shows each attention call a finite scope."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvtier import hf
from kvtier.attention import scope_attention
from kvtier.buffers import GrowableTensor
from kvtier.config import ReAttentionConfig
from kvtier.layer import ReAttentionLayer
from kvtier.persist import fingerprint, load_cache, save_cache
from kvtier.policies import build_policy
from kvtier.rotary import ScopeRotary
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
        self.policy = build_policy(self.config.policy, self.config.policy_options)
        self.spec = spec
        self.model_fingerprint = fingerprint(model)  # checked against the model a saved cache is loaded into
        self._rotary: dict[torch.device, ScopeRotary] = {}
        self._placement = SharedPlacement(self.config)  # made on the first layer's K/V (it needs their shape)
        self._tokens: GrowableTensor | None = None  # [B, T] the token ids fed, while they are known
        self._tokens_known = True
        super().__init__(
            layers=[ReAttentionLayer(self.config, self.policy, self._placement, index) for index in range(spec.num_layers)]
        )

    @property
    def placement(self) -> Placement | None:
        """Where the spans of every layer live (None until the first forward)."""
        return self._placement.placement

    def record_tokens(self, input_ids: torch.Tensor | None) -> None:
        """Called by the decoder hook with each forward's input ids [B, q] (None when embeddings were passed)."""
        if input_ids is None:
            self._tokens_known = False
            return
        if self._tokens is None:
            self._tokens = GrowableTensor((input_ids.shape[0], 0), 1, torch.long, torch.device("cpu"))
        elif input_ids.shape[0] != self._tokens.data.shape[0]:
            raise ValueError(
                f"this ReAttentionCache holds {self._tokens.data.shape[0]} sequences but got a batch of "
                f"{input_ids.shape[0]}; use a new cache for a new batch"
            )
        self._tokens.append(input_ids.detach().to("cpu", torch.long))

    @property
    def token_ids(self) -> torch.Tensor | None:
        """The token ids this cache holds [B, T] (None if some forward passed embeddings instead of ids): continue a
        saved context with `model.generate(torch.cat([cache.token_ids, more_ids], -1), past_key_values=cache)`."""
        if not self._tokens_known or self._tokens is None:
            return None
        return self._tokens.view().clone()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.layers[layer_idx].update(key_states, value_states)
        hf.publish(self, layer_idx, keys)
        return keys, values

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """query [B, Hq, q, D] pre-RoPE -> attention output [B, q, Hq, D] over the layer's scope."""
        return scope_attention(self.layers[layer_idx], self._rotary_on(query.device), query, scaling)

    def _rotary_on(self, device: torch.device) -> ScopeRotary:
        if device not in self._rotary:
            self._rotary[device] = ScopeRotary(
                self.spec.inv_freq, self.spec.attention_scaling, self.config.scope_bound, device
            )
        return self._rotary[device]

    def stats(self) -> dict[str, Any]:
        """A plain dict: tokens fed, the largest rotary position used and scope seen; per tier the spans and bytes
        resident, bytes moved in each direction, selection hits and misses, promotions, evictions and time waited;
        `gpu_fixed_bytes` is what stays on the GPU outside the span pool (global, local window, summaries)."""
        scope = max((layer.largest_scope for layer in self.layers), default=0)
        tiers = self.placement.stats() if self.placement is not None else Placement.empty_stats()
        return {
            "tokens": self.get_seq_length(),
            "max_position": scope - 1,
            "scope_tokens": scope,
            "scope_bound": self.config.scope_bound,
            **tiers,
            "gpu_fixed_bytes": sum(layer.resident_bytes() for layer in self.layers),
            "policy": self.config.policy,
        }

    def save(self, path: str | Path) -> None:
        """Write everything needed to continue into one LMDB file at `path`, atomically: an interrupted save
        leaves the previous file (or none), never a partial one."""
        save_cache(self, Path(path))

    @classmethod
    def load(cls, path: str | Path, model, **placement: Any) -> "ReAttentionCache":
        """Reopen a saved cache for `model` (checked against the saved fingerprint) and continue without re-running
        the prefill; spans stay in the file until selected. `placement` may set gpu_budget, host_budget,
        disk_path, disk_budget for this session."""
        return load_cache(cls, Path(path), model, placement)

    def close(self) -> None:
        """Wait for background copies, close the LMDB files and delete the spill file. The cache is unusable after."""
        if self.placement is not None:
            self.placement.close()

    def __repr__(self) -> str:
        return f"ReAttentionCache({self.config}, tokens={self.get_seq_length()})"
