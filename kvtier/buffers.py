"""Storage that grows by doubling (by less where the device cannot hold the doubled copy): tensors along one dimension
(appends copy in place, no per-step torch.cat) and per-span numpy arrays."""
from __future__ import annotations

import numpy as np
import torch


def buffer(shape, dtype: torch.dtype, device: torch.device | str = "cpu", pin_memory: bool = False,
           zeroed: bool = False) -> torch.Tensor:
    """An empty (or with `zeroed`, zero-filled) tensor the cache keeps across calls. Never an inference tensor, even
    when made under torch.inference_mode, so later calls may update it in place whichever mode their caller runs in."""
    with torch.inference_mode(False):
        made = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin_memory)
        return made.zero_() if zeroed else made


FULL_AT = 8  # a budgeted buffer (kvtier.tiers.gpu's pool) past 1/FULL_AT of its capacity takes all of it in one step


def growth_target(have: int, rows: int, capacity: int | None) -> int:
    """Slots a buffer of `have` slots grows to when it needs `rows`: double, or straight to a budget's capacity once
    past 1/FULL_AT of it - so the copy that grows a buffer briefly holds at most (1 + 1/FULL_AT) x the budget."""
    target = max(rows, 2 * have)
    if capacity is None:
        return target
    return capacity if target * FULL_AT > capacity else target


def fallback_targets(have: int, rows: int, capacity: int | None) -> list[int]:
    """growth_target, then smaller growths (+1/2, +1/4, just `rows`) to try when the device cannot hold the old and
    the new allocation at once: a buffer near the device's size still grows, a step at a time."""
    targets = [growth_target(have, rows, capacity), have + have // 2, have + have // 4, rows]
    if capacity is not None:
        targets = [min(target, capacity) for target in targets]
    return sorted({max(target, rows) for target in targets}, reverse=True)


def larger_buffer(data: torch.Tensor, dim: int, rows: int, capacity: int | None = None) -> torch.Tensor | None:
    """A new, unfilled buffer like `data` with at least `rows` entries along `dim`: growth_target's size or, where the
    device cannot hold it beside `data`, the first of fallback_targets' smaller growths it can; None if none fits."""
    shape = list(data.shape)
    for target in fallback_targets(data.shape[dim], rows, capacity):
        shape[dim] = target
        try:
            return buffer(shape, data.dtype, data.device)
        except torch.OutOfMemoryError:
            continue
    return None


def gather_rows(source: torch.Tensor, index: torch.Tensor, row_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Rows `index` [B'] (any order, repeats allowed) of source [B, ...] -> a new kept buffer (see `buffer`)
    [B', *row_shape] (row_shape: source's by default, else at least as large in every dimension) whose leading part
    holds them."""
    row_shape = tuple(source.shape[1:]) if row_shape is None else tuple(row_shape)
    out = buffer((index.shape[0], *row_shape), source.dtype, source.device)  # [B', *row_shape]
    out[tuple(slice(0, size) for size in (index.shape[0], *source.shape[1:]))] = source.index_select(
        0, index.to(source.device))
    return out


def scratch_rows(current: torch.Tensor | None, count: int, row_shape: tuple[int, ...], dtype: torch.dtype,
                 pin_memory: bool = False) -> torch.Tensor:
    """A kept scratch buffer [>= count, *row_shape] on the host: `current` when it has the rows, else a new one of
    max(count, twice as many) rows (what `current` held is not carried over)."""
    if current is not None and current.shape[0] >= count:
        return current
    rows = max(count, 2 * (0 if current is None else current.shape[0]))
    return buffer((rows, *row_shape), dtype, pin_memory=pin_memory)


def upload(values: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host array -> a tensor on `device`, without waiting for the device: on CUDA through pinned memory and
    a non-blocking copy (a plain .to() from pageable memory synchronises the stream: the CPU would wait for all the
    work queued before it)."""
    tensor = torch.from_numpy(values) if isinstance(values, np.ndarray) else values
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class GrowableTensor:
    def __init__(self, shape: tuple[int, ...], dim: int, dtype: torch.dtype, device: torch.device, capacity: int = 16):
        self.dim = dim
        self.length = 0
        shape = list(shape)
        shape[dim] = capacity
        self.data = buffer(shape, dtype, device)

    def append(self, rows: torch.Tensor) -> None:
        """rows: same shape as the buffer except along `dim`."""
        count = rows.shape[self.dim]
        self.reserve(self.length + count)
        self.data.narrow(self.dim, self.length, count).copy_(rows)
        self.length += count

    def reserve(self, capacity: int) -> None:
        if capacity <= self.data.shape[self.dim]:
            return
        grown = larger_buffer(self.data, self.dim, capacity)
        if grown is None:
            held = self.data.numel() * self.data.element_size()
            raise torch.OutOfMemoryError(
                f"kvtier cannot grow a buffer of {held / 2**30:.2f} GiB {tuple(self.data.shape)} on {self.data.device} "
                f"to {capacity} entries along dimension {self.dim}, not even a step at a time: the device is full; "
                "lower gpu_budget (the span pool) or the context")
        grown.narrow(self.dim, 0, self.length).copy_(self.view())
        self.data = grown

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` [B'] of dimension 0 (any order, repeats allowed; `dim` is another dimension)."""
        self.data = gather_rows(self.view(), index, self.data.shape[1:])

    def truncate(self, length: int) -> None:
        """Keep the first `length` entries along `dim` (at most those held)."""
        self.length = min(self.length, max(length, 0))

    def extend_to(self, length: int) -> None:
        """Make the first `length` entries along `dim` live (entries beyond the old length are uninitialised)."""
        self.reserve(length)
        self.length = max(self.length, length)

    def view(self) -> torch.Tensor:
        return self.data.narrow(self.dim, 0, self.length)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class GrowableArray:
    """A 1-D numpy array indexed by span uid that grows by doubling; new entries start at `fill`."""

    def __init__(self, dtype, fill, capacity: int = 1024):
        self.fill = fill
        self.data = np.full(capacity, fill, dtype=dtype)

    def ensure(self, size: int) -> None:
        if size > self.data.shape[0]:
            grown = np.full(max(size, 2 * self.data.shape[0]), self.fill, dtype=self.data.dtype)
            grown[: self.data.shape[0]] = self.data
            self.data = grown
