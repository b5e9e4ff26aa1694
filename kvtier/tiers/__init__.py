"""Where sealed spans' K/V live: a GPU slot pool (gpu.py), a pinned host pool (host.py) and LMDB files (disk.py,
disk_tier.py), each a SpanStore (base.py), composed by placement.py. The global tokens, the local window and the span
summaries never leave the GPU."""

TIERS = ("gpu", "host", "disk")
GPU, HOST, DISK = range(len(TIERS))  # a span's tier code: its index in TIERS

__all__ = ["DISK", "GPU", "HOST", "TIERS"]
