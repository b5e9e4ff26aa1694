"""kvtier: ReAttention KV-cache management for HuggingFace causal LMs (infinite context, finite attention scope)."""
from .cache import ReAttentionCache
from .config import ReAttentionConfig

__all__ = ["ReAttentionCache", "ReAttentionConfig"]
__version__ = "0.1.0"
