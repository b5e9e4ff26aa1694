"""Counters of the tier store, reported by `cache.stats()`."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TierCounters:
    """What happened in one tier since the cache was created."""

    hits: int = 0  # selected spans found in this tier
    misses: int = 0  # selected spans found only in a tier below this one
    promotions: int = 0  # spans moved up into this tier
    evictions: int = 0  # spans moved down out of this tier
    wait_s: float = 0.0  # time the attention call spent waiting on this tier (copies, reads, commits)

    def as_dict(self) -> dict:
        return asdict(self)


DIRECTIONS = ("gpu->host", "host->gpu", "host->disk", "disk->host")
