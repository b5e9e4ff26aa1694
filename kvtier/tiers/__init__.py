"""Where sealed spans' K/V live: a GPU slot pool (gpu.py), a pinned host pool (host.py) and an LMDB file (disk.py),
composed by placement.py. The global tokens, the local window and the span summaries never leave the GPU."""

TIERS = ("gpu", "host", "disk")

__all__ = ["TIERS"]
