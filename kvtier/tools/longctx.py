"""Long contexts without a long prefill, for benchmarks: record a model's pre-RoPE K/V once, feed it (tiled) into a
ReAttentionCache's layers until the cache holds N tokens; then time real decode steps (kvtier.tools.measure).

The model's own chunked prefill to 1M tokens costs O(N^2 / span) selections; filling the layers directly exercises
the same sealing, summaries and placement, so decode, memory and tier traffic are measured at full context."""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from kvtier.cache import ReAttentionCache
from kvtier.tools.measure import prefill, sync


def record_kv(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefill `ids` once -> per layer the pre-RoPE (keys, values) [1, Hkv, T, D] the cache received."""
    cache = ReAttentionCache(model)
    seen: dict[int, list] = {}
    update = cache.update

    def recording(keys, values, layer_idx, *args, **kwargs):
        seen.setdefault(layer_idx, []).append((keys.clone(), values.clone()))
        return update(keys, values, layer_idx, *args, **kwargs)

    cache.update = recording
    prefill(model, cache, ids, 1024)
    return [tuple(torch.cat(parts, dim=2) for parts in zip(*seen[i])) for i in sorted(seen)]


def fill(cache: ReAttentionCache, kv, context: int) -> float:
    """Feed the recorded K/V, tiled, into every layer until the cache holds `context` tokens -> seconds taken."""
    length = kv[0][0].shape[2]
    chunk = cache.config.chunk_size
    began = time.perf_counter()
    with torch.inference_mode():
        for start in tqdm(range(0, context, chunk), desc="fill", unit="chunk", leave=False):
            positions = torch.arange(start, min(start + chunk, context), device=kv[0][0].device) % length
            for layer, (keys, values) in zip(cache.layers, kv):
                layer.update(keys[:, :, positions], values[:, :, positions])
                layer.ingest(*layer.take_pending())
    sync()
    return time.perf_counter() - began
