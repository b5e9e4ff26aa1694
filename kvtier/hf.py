"""The only module that knows transformers internals: registration, hooks, version shims.

How kvtier rides inside an unmodified model (see docs/architecture.md):
- an attention function "reattention" and a mask function of the same name are registered;
- a pre-hook on the decoder notices when a ReAttentionCache drives the forward; while it does, a hook on the rotary
  module returns cos = 1, sin = 0, so q and k reach the cache and the attention function un-rotated;
- the cache's `update` publishes (cache, layer, key) in a context variable; the attention function recognises its
  own key and runs the scope attention, and otherwise (any other cache, or none) runs stock SDPA;
- the decoder's forward is wrapped (as accelerate's hooks wrap a module's forward) so that a HostedCache may run it
  itself: kvtier.graphs replays a captured decode step through it. With any other cache it runs as it was.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "reattention"
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# the ReAttentionCache driving the current decoder forward, if any
_ACTIVE_CACHE: contextvars.ContextVar[Any] = contextvars.ContextVar("kvtier_active_cache", default=None)
# the values _ACTIVE_CACHE had before each decoder forward in progress (nested forwards), innermost last: a context
# variable too, so that threads running forwards of one model at once each keep their own
_OUTER_CACHES: contextvars.ContextVar[tuple] = contextvars.ContextVar("kvtier_outer_caches", default=())
# (cache, layer_idx, key tensor) published by the last cache.update
_PUBLISHED: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("kvtier_published", default=None)


@dataclass(frozen=True)
class ModelSpec:
    """What kvtier needs to know of a model, read once when a cache binds it."""

    family: str
    window: int
    num_layers: int
    inv_freq: torch.Tensor
    attention_scaling: float


class HostedCache(Cache):
    """A Cache the hooks below drive: while one is the forward's cache, rotary is neutralised, each forward's input ids
    and attention mask are handed to `begin_forward`, and the attention call for a key its `update` published goes to
    `attend`. ReAttentionCache is the one kvtier ships; this base keeps hf.py from importing it."""

    def begin_forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        raise NotImplementedError

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        raise NotImplementedError

    def run_decoder(self, forward: Callable, kwargs: dict[str, Any]):
        """Run the decoder's own `forward` on this forward's keyword arguments (the cache may replay it instead)."""
        return forward(**kwargs)


def publish(cache: HostedCache, layer_idx: int, key: torch.Tensor) -> None:
    _PUBLISHED.set((cache, layer_idx, key))


def reattention_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """AttentionInterface entry: the scope attention for our own cache's keys, stock SDPA for anything else."""
    published = _PUBLISHED.get()
    if published is None or published[2] is not key or published[1] != module.layer_idx:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return published[0].attend(module.layer_idx, query, scaling), None


def reattention_mask(*args, **kwargs):
    """Mask entry: nothing to build for the scope attention (it masks per chunk itself, and the cache took the padding
    from the decoder's attention mask); stock SDPA's otherwise."""
    if _ACTIVE_CACHE.get() is None:
        return sdpa_mask(*args, **kwargs)
    return None


def _register_interfaces() -> None:
    # the interfaces are mappings; registering the same function again changes nothing
    if AttentionInterface().get(ATTENTION_NAME) is not reattention_attention:
        AttentionInterface.register(ATTENTION_NAME, reattention_attention)
    if AttentionMaskInterface().get(ATTENTION_NAME) is not reattention_mask:
        AttentionMaskInterface.register(ATTENTION_NAME, reattention_mask)


def cache_keyword(model) -> str:
    """The name of `model.forward`'s cache argument: transformers 5.24 renamed `past_key_values` to `cache` (the old
    name warns until 5.40); 5.17 has only the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(kwargs: dict) -> Any:
    # transformers 5.24 renamed the decoder's `past_key_values` argument to `cache`; accept both
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _decoder_pre_hook(module, args, kwargs):
    cache = _cache_of(kwargs)
    ours = isinstance(cache, HostedCache)
    _OUTER_CACHES.set(_OUTER_CACHES.get() + (_ACTIVE_CACHE.get(),))  # the post-hook puts it back, always
    _ACTIVE_CACHE.set(cache if ours else None)
    if ours:
        cache.begin_forward(kwargs.get("input_ids"), kwargs.get("attention_mask"))


def _decoder_post_hook(module, args, kwargs, output):
    outer = _OUTER_CACHES.get()
    _ACTIVE_CACHE.set(outer[-1])
    _OUTER_CACHES.set(outer[:-1])
    _PUBLISHED.set(None)  # drop the reference to the last key tensor


def _decoder_forward(forward: Callable) -> Callable:
    """The decoder's forward, handed to the cache when a HostedCache drives it (what accelerate's hooks do to a
    module's forward): kvtier.graphs replays captured decode steps through it."""

    @functools.wraps(forward)
    def hosted_forward(*args, **kwargs):
        cache = _cache_of(kwargs)
        if args or not isinstance(cache, HostedCache):
            return forward(*args, **kwargs)
        return cache.run_decoder(forward, kwargs)

    return hosted_forward


def _rotary_hook(module, args, output):
    if _ACTIVE_CACHE.get() is None:
        return output
    cos, sin = output
    return torch.ones_like(cos), torch.zeros_like(sin)


def model_spec(model) -> ModelSpec:
    """Check the model is one kvtier can host and read its shape; ValueError naming the problem otherwise."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"kvtier supports the {', '.join(SUPPORTED_FAMILIES)} model families; got model_type={family!r}. "
            "Load a supported model (e.g. Llama, Mistral, Qwen2, Qwen3)"
        )
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "original_inv_freq"):
        raise ValueError(
            f"this {family} model has no rotary embedding module (decoder.rotary_emb with original_inv_freq); "
            "ReAttention re-assigns rotary positions and needs a RoPE model"
        )
    window = getattr(config, "max_position_embeddings", None)
    if not isinstance(window, int) or window <= 0:
        raise ValueError(f"the model config has no positive max_position_embeddings (got {window!r}); set it to its trained window")
    return ModelSpec(
        family=family,
        window=window,
        num_layers=config.num_hidden_layers,
        inv_freq=rotary.original_inv_freq.detach().clone(),
        attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
    )


def layer_device_shares(model) -> dict[torch.device, float]:
    """Each device the model's attention layers are on (their key projections) -> its fraction of the layers: one
    entry for a model on one device, several for one spread by accelerate's device_map."""
    devices = [layer.self_attn.k_proj.weight.device for layer in model.get_decoder().layers]
    return {device: devices.count(device) / len(devices) for device in dict.fromkeys(devices)}


def tensor_parallel_group(model):
    """The process group over which tensor parallelism (transformers' tp_plan) splits this model's attention heads, or
    None: read from the first layer's key projection, a DTensor sharded by rows (its output heads) under a tp_plan."""
    weight = model.get_decoder().layers[0].self_attn.k_proj.weight
    mesh = getattr(weight, "device_mesh", None)
    if mesh is None:
        return None
    from torch.distributed.tensor import Shard

    rows = [dim for dim, placement in enumerate(weight.placements) if isinstance(placement, Shard) and placement.dim == 0]
    if not rows or mesh.size(rows[0]) == 1:
        return None
    return mesh.get_group(mesh_dim=rows[0])


def bind_model(model) -> ModelSpec:
    """Switch `model` to kvtier's attention and install the hooks, once (idempotent). With any other cache the
    switched model computes exactly what stock SDPA does."""
    spec = model_spec(model)
    _register_interfaces()
    model.set_attn_implementation(ATTENTION_NAME)  # changes nothing when the model already uses it
    decoder = model.get_decoder()
    if not getattr(decoder, "_kvtier_hooked", False):
        decoder.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True)
        decoder.register_forward_hook(_decoder_post_hook, with_kwargs=True, always_call=True)
        decoder.rotary_emb.register_forward_hook(_rotary_hook)
        decoder.forward = _decoder_forward(decoder.forward)
        decoder._kvtier_hooked = True
    return spec
