"""Where sealed spans' K/V live. Only the model's-device slot pool exists so far; host and disk tiers come later."""
from .gpu import SlotPool

TIERS = ("gpu", "host", "disk")
TIER_GPU = 0

__all__ = ["SlotPool", "TIERS", "TIER_GPU"]
