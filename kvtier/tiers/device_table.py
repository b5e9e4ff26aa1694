"""The device-side location table of the kernel path without a disk tier: `where[uid]` is the span's GPU pool slot
(>= 0) or -1 - its host slot, written in stream order whenever a span moves; and the selections read through it,
copied to the host without waiting, handed back for booking once the copy has landed."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from kvtier.buffers import GrowableTensor, upload


class DeviceTable:
    def __init__(self, device: torch.device):
        self.device = device
        self.where = GrowableTensor((0,), 0, torch.long, device)  # [uids]
        self._cuda = device.type == "cuda"
        self._copied: list[tuple[torch.cuda.Event | None, torch.Tensor]] = []  # selections on their way, oldest first

    def publish(self, uids: np.ndarray, loc: np.ndarray, count: int) -> None:
        """uids [N] now live at loc [N] (GPU slot, or -1 - host slot); `count` uids exist. Written in stream order:
        kernels queued before still see the old place, which stays valid until they have run (the placement frees a
        GPU slot only once a copy of its span is complete, and rewrites host slots only after queued reads)."""
        if not len(uids):
            return
        self.where.extend_to(count)
        pairs = upload(np.stack((uids, loc)), self.device)  # [2, N]
        self.where.data[pairs[0]] = pairs[1]

    def lookup(self, uids: torch.Tensor) -> torch.Tensor:
        """uids (any shape, on the device) -> their loc, the same shape, on the device."""
        return self.where.data[uids]

    def copy_to_host(self, uids: torch.Tensor) -> None:
        """Start copying uids (any shape, on the device) to the host without waiting (pinned memory on CUDA)."""
        landed = torch.empty(uids.shape, dtype=uids.dtype, pin_memory=self._cuda)
        landed.copy_(uids, non_blocking=True)
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        self._copied.append((event, landed))

    def landed(self, wait: bool) -> Iterator[np.ndarray]:
        """The distinct uids [M] of each copied selection whose copy has landed, oldest first (all, waiting, when
        `wait`)."""
        while self._copied and (wait or self._copied[0][0] is None or self._copied[0][0].query()):
            event, landed = self._copied.pop(0)
            if event is not None:
                event.synchronize()
            yield np.unique(landed.numpy())
