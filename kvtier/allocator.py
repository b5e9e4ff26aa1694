"""How PyTorch pins host memory for the host tier, set through its allocator settings (PYTORCH_CUDA_ALLOC_CONF, or
PYTORCH_ALLOC_CONF). By default each pinned block comes from cudaHostAlloc, which maps and locks its pages on one
thread while holding the driver's lock: 2.6 GiB/s on the H200, so a 1M-token prefill of the Llama-3.1-8B shape spent
~40 s pinning ~109 GiB of host tier. With PINNED_REGISTER the blocks are plain memory whose pages 8 threads map before
one cudaHostRegister: 9.2 GiB/s, and that prefill took 98 s instead of 170 (benchmarks/RESULTS.md section 25).
This module imports no torch: the `kvtier` command applies the setting before torch reads it."""
from __future__ import annotations

import os
from typing import MutableMapping

PINNED_REGISTER = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
SETTINGS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # PyTorch reads either (the second is the newer name)


def registers_pinned_pages(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether the allocator settings in `environ` pin host memory by cudaHostRegister."""
    return any("pinned_use_cuda_host_register:true" in environ.get(name, "").replace(" ", "").lower()
               for name in SETTINGS)


def prefer_pinned_register(environ: MutableMapping[str, str] = os.environ) -> None:
    """Add PINNED_REGISTER to the allocator settings in `environ` unless they already say how to pin host memory
    (a user's choice stands): appended to the variable the user set, else PYTORCH_CUDA_ALLOC_CONF. Takes effect only
    before torch initialises CUDA."""
    if any("pinned_use_cuda_host_register" in environ.get(name, "") for name in SETTINGS):
        return
    name = next((name for name in SETTINGS if environ.get(name)), SETTINGS[0])
    environ[name] = ",".join(part for part in (environ.get(name, ""), PINNED_REGISTER) if part)
