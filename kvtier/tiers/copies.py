"""The copies between tiers, in stream and event order: GPU -> host on a copy stream with an event per batch, host ->
GPU through pinned staging or by one kernel reading the pinned host slots in place, disk -> host through pageable
staging, host -> disk a slice at a time for the writer thread. Which spans move, and the books, are the placement's."""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import torch

from kvtier import dispatch
from kvtier.buffers import scratch_rows, upload
from kvtier.tiers.base import SpanStore
from kvtier.tiers.gpu import DevicePool
from kvtier.tiers.host import HostPool

WRITE_SLICE_BYTES = 256 * 2**20  # host -> disk victims are copied for the writer this many bytes at a time


class Copies:
    def __init__(self, gpu: DevicePool, host: HostPool, device: torch.device):
        self.gpu, self.host, self.device = gpu, host, device
        self.span_shape, self.dtype = host.span_shape, host.dtype
        self.span_bytes = int(np.prod(self.span_shape)) * self.dtype.itemsize
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._to_host: list[tuple[torch.cuda.Event | None, np.ndarray]] = []  # GPU -> host, oldest first
        self._staging: torch.Tensor | None = None  # pinned [n, 2, Hkv, S, D] for host -> GPU copies
        self._staging_free: torch.cuda.Event | None = None
        self._disk_staging: torch.Tensor | None = None  # [n, 2, Hkv, S, D] pageable, spans read from disk
        self._host_reads: torch.cuda.Event | None = None  # after the last kernel that read host slots in place
        self.host_wait_s = 0.0  # time spent waiting on copies to and from the host

    # ---- GPU -> host --------------------------------------------------------------------------------------------
    def gpu_to_host(self, uids: np.ndarray) -> None:
        """Copy the GPU spans of uids into the host pool: on CUDA on the copy stream, after the work queued so far,
        with an event; the GPU slots stay valid until landed_on_host hands the uids back."""
        event = None
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self.gpu.data.record_stream(self._stream)
                self.host.put(uids, self.gpu.take(uids))
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            self.host.put(uids, self.gpu.take(uids))
        self._to_host.append((event, uids))

    def in_flight_to_host(self) -> int:
        """Spans whose GPU -> host copy has not been handed back by landed_on_host."""
        return sum(len(uids) for _, uids in self._to_host)

    def landed_on_host(self, wait: bool) -> Iterator[np.ndarray]:
        """The uids of each GPU -> host copy that has completed, oldest first; with `wait`, after waiting for the
        oldest one."""
        while self._to_host:
            event, uids = self._to_host[0]
            if event is not None and not event.query():
                if not wait:
                    return
                start = time.perf_counter()
                event.synchronize()
                self.host_wait_s += time.perf_counter() - start
                wait = False
            self._to_host.pop(0)
            yield uids

    # ---- host -> GPU --------------------------------------------------------------------------------------------
    def host_to_gpu(self, uids: np.ndarray) -> torch.Tensor:
        """Host spans of uids [N] -> a new tensor [N, 2, Hkv, S, D] on the device: one batched copy through pinned
        staging (asynchronous on CUDA)."""
        start = time.perf_counter()
        staging = self._staging_rows(len(uids))
        self.host.get_into(uids, staging)
        rows = staging.to(self.device, non_blocking=True)
        if self._stream is not None:
            self._staging_free = torch.cuda.Event()
            self._staging_free.record()
        self.host_wait_s += time.perf_counter() - start
        return rows

    def _staging_rows(self, count: int) -> torch.Tensor:
        if self._staging_free is not None:
            self._staging_free.synchronize()  # the previous copy out of the staging buffer has finished
        self._staging = scratch_rows(self._staging, count, self.span_shape, self.dtype, self._stream is not None)
        return self._staging[:count]

    def host_to_pool(self, uids: np.ndarray) -> None:
        """Host spans of uids -> newly reserved GPU pool slots, by one kernel reading the pinned host slots in place
        through UVA (the host slots are rewritten only after host_reads_launched's event, which follows it)."""
        slots = np.stack((self.gpu.reserve(uids), self.host.slots_of(uids)))  # [2, N]: pool, host
        dispatch.copy_host_spans(self.gpu.data, self.host.blocks, upload(slots, self.device))

    def host_reads_launched(self) -> None:
        """A kernel reading host slots in place is queued: host slots are not rewritten from the CPU before it ran."""
        if self._stream is not None:
            self._host_reads = torch.cuda.Event()
            self._host_reads.record()

    # ---- disk <-> host ------------------------------------------------------------------------------------------
    def disk_to_host(self, uids: np.ndarray, disk: SpanStore) -> None:
        """Spans of uids from `disk` -> staging -> the host pool (which has room for them)."""
        # pageable: a CPU to CPU copy gains nothing from pinned rows, and pinning more next to a large pinned pool
        # may wait for the kernel to write the spill file's dirty pages back
        self._disk_staging = scratch_rows(self._disk_staging, len(uids), self.span_shape, self.dtype)
        staging = self._disk_staging[: len(uids)]
        disk.get_into(uids, staging)
        if self._host_reads is not None:
            self._host_reads.synchronize()  # a queued gather may still read the host slots about to be rewritten
        self.host.put(uids, staging)

    def host_to_disk(self, uids: np.ndarray, disk: SpanStore) -> None:
        """Host spans of uids -> `disk`, which writes them in the background: a slice at a time (a batch of victims
        may be gigabytes), each copy owned by the writer and freed once written."""
        per_slice = max(1, WRITE_SLICE_BYTES // self.span_bytes)
        for start in range(0, len(uids), per_slice):
            part = uids[start : start + per_slice]
            copy = torch.empty((len(part), *self.span_shape), dtype=self.dtype)  # [n, 2, Hkv, S, D]
            self.host.get_into(part, copy)
            disk.put(part, copy)
