"""ReAttentionCache: a transformers Cache that keeps all KV but shows each attention call a finite scope."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache

from kvtier import hf
from kvtier.attention import scope_attention
from kvtier.config import ReAttentionConfig
from kvtier.layer import ReAttentionLayer
from kvtier.policies import build_policy
from kvtier.rotary import ScopeRotary
from kvtier.tiers import TIERS


class ReAttentionCache(Cache):
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
        self._rotary: dict[torch.device, ScopeRotary] = {}
        super().__init__(layers=[ReAttentionLayer(self.config, self.policy) for _ in range(spec.num_layers)])

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
        """tokens fed, the largest rotary position used and scope seen, spans and resident bytes per tier."""
        scope = max((layer.largest_scope for layer in self.layers), default=0)
        return {
            "tokens": self.get_seq_length(),
            "max_position": scope - 1,
            "scope_tokens": scope,
            "scope_bound": self.config.scope_bound,
            "spans": _per_tier(gpu=sum(layer.spans() for layer in self.layers)),
            "bytes": _per_tier(gpu=sum(layer.resident_bytes() for layer in self.layers)),
            "policy": self.config.policy,
        }

    def __repr__(self) -> str:
        return f"ReAttentionCache({self.config}, tokens={self.get_seq_length()})"


def _per_tier(**counts: int) -> dict[str, int]:
    return {tier: counts.get(tier, 0) for tier in TIERS}
