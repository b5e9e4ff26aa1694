"""Per-layer regions of one attention layer's KV, for all rows of a batch: global sinks, the local window, the
table of sealed spans (where each lives, and its summary)."""
from __future__ import annotations

import torch

from kvtier.buffers import GrowableTensor, buffer, gather_rows, upload


class GlobalRegion:
    """The first G tokens of every row; always in scope, never evicted."""

    def __init__(self, batch: int, kv_heads: int, size: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.keys = buffer((batch, kv_heads, size, head_dim), dtype, device)  # [B, Hkv, G, D]
        self.values = buffer(self.keys.shape, dtype, device)
        self.length = 0

    def absorb(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Take as many of keys/values [B, Hkv, q, D] as still fit; return how many were taken."""
        taken = min(self.keys.shape[2] - self.length, keys.shape[2])
        if taken == 0:
            return 0
        self.keys[:, :, self.length : self.length + taken] = keys[:, :, :taken]
        self.values[:, :, self.length : self.length + taken] = values[:, :, :taken]
        self.length += taken
        return taken

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` [B'] (any order, repeats allowed)."""
        self.keys, self.values = gather_rows(self.keys, index), gather_rows(self.values, index)

    def drop_newest(self, count: int) -> None:
        """Forget the `count` newest tokens (at most those held)."""
        self.length -= count


def spans_to_seal(sealed: int, window: int, local_size: int, span_size: int, group: int) -> int:
    """How many spans a layer with `sealed` spans and `window` tokens in its local window seals now: the oldest
    tokens leave in whole spans, `group` of them at a time, so that the sealed count is the largest multiple of
    `group` not above what sealing down to local_size would give (group 1: every span as it fills). A pure function of
    the tokens held (while `sealed` is a multiple of `group`): the window keeps between local_size - span_size + 1 and
    local_size + (group - 1) * span_size tokens."""
    if window <= local_size:
        return 0
    wanted = sealed + -(-(window - local_size) // span_size)
    return max(0, wanted // group * group - sealed)


class LocalWindow:
    """The most recent tokens, in a buffer written in place; the oldest leave from the front as spans are sealed.
    Room for two windows plus a chunk, so the live part is moved back to the start only once per window."""

    def __init__(
        self, batch: int, kv_heads: int, window: int, chunk: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ):
        capacity = 2 * window + chunk
        self.keys = buffer((batch, kv_heads, capacity, head_dim), dtype, device)  # [B, Hkv, cap, D]
        self.values = buffer(self.keys.shape, dtype, device)
        self.start = 0
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        count = keys.shape[2]
        if self.start + self.length + count > self.keys.shape[2]:
            self._compact()
        end = self.start + self.length
        self.keys[:, :, end : end + count] = keys
        self.values[:, :, end : end + count] = values
        self.length += count

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold exactly keys / values [B, Hkv, n, D] (n <= the window), copied to the buffer's start."""
        count = keys.shape[2]
        self.keys[:, :, :count] = keys
        self.values[:, :, :count] = values
        self.start, self.length = 0, count

    def pop_front(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove the `count` oldest tokens; returns views [B, Hkv, count, D], valid until the next append."""
        keys = self.keys[:, :, self.start : self.start + count]
        values = self.values[:, :, self.start : self.start + count]
        self.start += count
        self.length -= count
        return keys, values

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        live = slice(self.start, self.start + self.length)
        return self.keys[:, :, live], self.values[:, :, live]

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` [B'] (any order, repeats allowed); their live tokens move to the start of new buffers."""
        keys, values = self.view()
        self.keys = gather_rows(keys, index, self.keys.shape[1:])
        self.values = gather_rows(values, index, self.values.shape[1:])
        self.start = 0

    def drop_newest(self, count: int) -> None:
        """Forget the `count` newest tokens (at most those held)."""
        self.length -= count

    def _compact(self) -> None:
        live = slice(self.start, self.start + self.length)
        self.keys[:, :, : self.length] = self.keys[:, :, live].clone()
        self.values[:, :, : self.length] = self.values[:, :, live].clone()
        self.start = 0


class SpanTable:
    """Sealed spans of every row: each span's uid (the placement knows where it lives) and its summary, which stays
    on the model's device."""

    def __init__(
        self, batch: int, kv_heads: int, summary_size: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ):
        self.uids = GrowableTensor((batch, 0), 1, torch.long, device)  # [B, n] on the device, to index the GPU pool
        self.uids_host = GrowableTensor((batch, 0), 1, torch.long, torch.device("cpu"))  # [B, n] for the placement
        self.summaries = GrowableTensor((batch, kv_heads, 0, summary_size, head_dim), 2, dtype, device)  # [B, Hkv, n, c, D]

    def append(self, uids: torch.Tensor, summaries: torch.Tensor) -> None:
        """uids [B, m] on the CPU, summaries [B, Hkv, m, c, D] for m newly sealed spans per row."""
        self.uids_host.append(uids)
        self.uids.append(upload(uids, self.uids.data.device))
        self.summaries.append(summaries)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` [B'] (any order, repeats allowed): their uids and summaries, not the spans they name."""
        self.uids.keep_rows(index)
        self.uids_host.keep_rows(index.cpu())
        self.summaries.keep_rows(index)

    def __len__(self) -> int:
        return self.uids.length

    @property
    def nbytes(self) -> int:
        return self.uids.nbytes + self.summaries.nbytes
