"""Memory readings for profiles: the GPU (the driver's view through pynvml, torch's allocator and its peak), the
process's resident host memory, and the bytes a folder really occupies on disk - and a background thread that samples
them all; freeing what a finished cache left; and how far kvtier's GPU span pool grows for a context."""
from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

from kvtier.buffers import growth_target


class Sample(NamedTuple):
    t: float  # seconds since the sampler started
    phase: str  # the label set by the last MemorySampler.phase call
    device_used: int | None  # bytes in use on the GPU, all processes, CUDA contexts and torch's cache included
    torch_allocated: int | None  # bytes of live tensors on the GPU (torch.cuda.memory_allocated)
    torch_peak: int | None  # torch.cuda.max_memory_allocated: the peak since the last reset_peak_memory_stats
    rss: int | None  # resident host memory of this process
    disk: int | None  # bytes allocated on disk under the sampler's disk_path (None without one)


def rss_bytes() -> int | None:
    """Resident set size of this process (pinned host memory and mapped file pages included)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        try:
            import psutil
        except ImportError:
            return None
        return psutil.Process().memory_info().rss


def host_bytes(field: str) -> int | None:
    """A /proc/meminfo field in bytes: "MemTotal", "MemAvailable" (None where there is no /proc)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                name, _, value = line.partition(":")
                if name == field:
                    return int(value.split()[0]) * 1024
    except OSError:
        pass
    return None


def filesystem_of(path: str | os.PathLike) -> str | None:
    """The type of the filesystem holding `path` ("ext4", "tmpfs", ...) from /proc/mounts; None without /proc."""
    path = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                point, fs_type = line.split()[1:3]
                point = point.replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fs_type
    except OSError:
        return None
    return kind


def disk_bytes(path: str | os.PathLike) -> int:
    """Bytes the files under `path` occupy on disk: allocated blocks, so a sparse file (an LMDB map) counts only what
    was written. 0 when `path` does not exist; files deleted while the folder is walked are skipped."""
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                total += os.stat(os.path.join(folder, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def release_memory(device: torch.device) -> None:
    """Free what a finished cache left: its garbage, torch's cached GPU blocks (so the next cache's pool is a fresh
    allocation, not carved out of the last one's segment: a 100 GiB pool grown inside a freed 100 GiB segment
    cannot take the rest of it in one step) and pinned host blocks; reset the peak."""
    gc.collect()
    if device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    # torch's pinned-host cache keeps freed blocks (and their RSS) for reuse; its private emptier was renamed in 2.12.
    empty_host = getattr(torch._C, "_host_emptyCache", None) or getattr(torch._C, "_accelerator_emptyHostCache", None)
    if empty_host is not None:
        empty_host()
    torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device, reset: bool = False) -> int | None:
    """Bytes torch allocated at most on a CUDA `device` since the last reset (None elsewhere); `reset` starts a new
    period."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


class PoolGrowth(NamedTuple):
    slots: int  # the allocation once it holds every span
    peak: int  # the most slots allocated at once: growing copies the old allocation into the new one


def pool_growth(spans: int, capacity: int | None = None, first: int = 16) -> PoolGrowth:
    """How kvtier.tiers.gpu.DevicePool's allocation grows while `spans` spans are added a few at a time: from `first`
    slots (at most `capacity`, the budget's slots; None: no budget) by growth_target - doubling, or straight to the
    capacity once past 1/8 of it - the old and the new allocation both held during each growth's copy. With no
    capacity this is also how the span table's GrowableTensor (the summaries) grows."""
    need = spans if capacity is None else min(spans, capacity)
    have = first if capacity is None else min(first, capacity)
    peak = have
    while have < need:
        grown = growth_target(have, have + 1, capacity)
        peak, have = have + grown, grown
    return PoolGrowth(have, peak)


class DeviceMemory:
    """One CUDA device's memory as the driver sees it (pynvml: everything on the GPU, None when nvidia-ml-py is not
    installed) and as torch's allocator does (live tensors and their peak)."""

    def __init__(self, device: torch.device):
        self.index = torch.device(device).index
        if self.index is None:
            self.index = torch.cuda.current_device()
        self._handle = None
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:  # no usable driver library: torch's figures still come
            return
        self._nvml = pynvml
        self._handle = self._find_handle(pynvml)

    def _find_handle(self, pynvml):
        """By UUID, which CUDA_VISIBLE_DEVICES does not renumber; by index where torch gives no UUID."""
        uuid = getattr(torch.cuda.get_device_properties(self.index), "uuid", None)
        if uuid is not None:
            uuid = str(uuid)
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            except pynvml.NVMLError:
                pass
        return pynvml.nvmlDeviceGetHandleByIndex(self.index)

    def _info(self):
        return None if self._handle is None else self._nvml.nvmlDeviceGetMemoryInfo(self._handle)

    def used(self) -> int | None:
        info = self._info()
        return None if info is None else int(info.used)

    def total(self) -> int:
        return torch.cuda.get_device_properties(self.index).total_memory

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.index)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.index)

    def close(self) -> None:
        if self._handle is not None:
            self._handle = None
            self._nvml.nvmlShutdown()


class MemorySampler:
    """Samples memory every `interval_s` on a background thread, and at each `phase` call:

        with MemorySampler(0.1, disk_path="/tmp/spill", device=model.device) as sampler:
            sampler.phase("fill")
            ...
        sampler.samples  # [Sample], t increasing

    GPU fields are None unless `device` is a CUDA device; `disk` is None without a `disk_path`."""

    def __init__(self, interval_s: float, disk_path: str | os.PathLike | None = None,
                 device: torch.device | str | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.disk_path = None if disk_path is None else Path(disk_path)
        cuda = device is not None and torch.device(device).type == "cuda"
        self.device = DeviceMemory(torch.device(device)) if cuda else None
        self.samples: list[Sample] = []
        self._label = "start"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = 0.0
        self.thread = threading.Thread(target=self._run, name="kvtier-memory-sampler", daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._started = time.perf_counter()
        self.record()
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self.thread.join()
        self.record()
        if self.device is not None:
            self.device.close()

    def phase(self, label: str) -> None:
        """Label the samples from now on, and take one at once (so a short phase still has a sample)."""
        with self._lock:
            self._label = label
        self.record()

    def record(self) -> Sample:
        with self._lock:
            device = self.device
            sample = Sample(
                t=time.perf_counter() - self._started,
                phase=self._label,
                device_used=None if device is None else device.used(),
                torch_allocated=None if device is None else device.allocated(),
                torch_peak=None if device is None else device.peak(),
                rss=rss_bytes(),
                disk=None if self.disk_path is None else disk_bytes(self.disk_path),
            )
            self.samples.append(sample)
        return sample

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.record()

    def columns(self) -> dict[str, list]:
        """The samples as one list per field (t in milliseconds precision), for JSON."""
        with self._lock:
            samples = list(self.samples)
        columns = {name: [getattr(sample, name) for sample in samples] for name in Sample._fields}
        columns["t"] = [round(t, 3) for t in columns["t"]]
        return columns
