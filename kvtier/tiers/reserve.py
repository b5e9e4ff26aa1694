"""Host blocks allocated ahead of need, on a background thread. Pinning host memory is slow (the CUDA driver maps and
locks every page: a 256 MiB block takes tens to hundreds of milliseconds), and a host pool growing by a block per
eviction batch paid it inside the attention call that evicted: a 1M-token prefill of the Llama-3.1-8B shape pins
~109 GiB that way (benchmarks/RESULTS.md section 24d). The reserve keeps `ahead` blocks allocated beyond those handed
out, so the pool takes a ready block and the next ones are pinned while the GPU works."""
from __future__ import annotations

import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch


class BlockReserve:
    def __init__(self, allocate: Callable[[], torch.Tensor], ahead: int, limit: int | None = None):
        """allocate() -> one new block; `ahead`: blocks kept allocated beyond those taken; `limit`: the most blocks
        ever allocated (a bounded pool's), None for no limit."""
        if ahead < 1:
            raise ValueError(f"a block reserve keeps at least one block ahead, got ahead={ahead}")
        self._allocate, self.ahead, self.limit = allocate, ahead, limit
        self._pending: deque[Future] = deque()  # blocks on their way, in the order take() hands them out
        self.requested = 0  # blocks asked of the thread so far (taken + pending)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-host-blocks")
        weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)

    def take(self) -> torch.Tensor:
        """The next block: ready, or waited for (allocated now if none was on its way); then the reserve is topped up
        to `ahead` blocks. An allocation's error is raised here, by the take that needed the block."""
        if not self._pending:
            self._request(1)
            if not self._pending:
                raise AssertionError(f"all {self.limit} blocks of this bounded pool are taken: it is full")
        block = self._pending.popleft().result()
        self._request(self.ahead - len(self._pending))
        return block

    @property
    def ready(self) -> int:
        """Blocks allocated and not taken yet."""
        return sum(future.done() and future.exception() is None for future in self._pending)

    def _request(self, count: int) -> None:
        if self.limit is not None:
            count = min(count, self.limit - self.requested)
        for _ in range(max(count, 0)):
            self._pending.append(self._executor.submit(self._allocate))
            self.requested += 1
