"""Fixtures the kernel-against-reference modules share: their CPU cases run under Triton's interpreter, each test draws
its inputs from a seed of its own."""
from __future__ import annotations

import os
import zlib

import pytest
import torch


@pytest.fixture
def cpu_cases_run_interpreted(request):
    """The CPU cases feed CPU tensors to Triton's interpreter (CI); compiled Triton takes CUDA tensors only, so on a
    CUDA machine the gpu-marked cases test the kernels instead."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpreted and request.node.get_closest_marker("gpu") is None and torch.cuda.is_available():
        pytest.skip("a CPU-tensor case for Triton's interpreter; the gpu-marked cases run on this CUDA machine")


@pytest.fixture
def seed(request) -> int:
    """Fresh inputs for every test, the same on every run."""
    return zlib.crc32(request.node.nodeid.encode())
