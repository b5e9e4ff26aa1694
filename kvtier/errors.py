"""Errors kvtier raises for files and tiers; each message names the problem and the fix."""
from __future__ import annotations


class CacheFileNotFoundError(FileNotFoundError):
    """A saved cache path that does not exist."""


class CorruptCacheError(ValueError):
    """A saved cache (or a spilled span) that is not a complete kvtier cache: bad header, checksum or layout."""


class IncompatibleCacheError(ValueError):
    """A saved cache written by another kvtier format version or for another model."""


class CacheWriteError(OSError):
    """Saving or spilling failed (path not writable, disk full); what was on disk before is unchanged."""


class TierFullError(RuntimeError):
    """A tier's budget cannot hold what must live in it."""
