"""kvtier: ReAttention KV-cache management for HuggingFace causal LMs (infinite context, finite attention scope)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ReAttentionConfig
from .version import __version__

if TYPE_CHECKING:
    from .cache import ReAttentionCache

__all__ = ["ReAttentionCache", "ReAttentionConfig"]


def __getattr__(name: str):
    # Imported on first use, so that `kvtier.tools.cli` can set threading options before torch loads.
    if name == "ReAttentionCache":
        from .cache import ReAttentionCache

        return ReAttentionCache
    raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
