"""kernels.rotary.rotate (a chunk's queries at scope positions) against its reference, which is
kvtier.rotary.ScopeRotary's math. On a CPU-only machine the kernel runs in Triton's interpreter (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

from kvtier.kernels.rotary import rotate, rotate_reference
from kvtier.rotary import ScopeRotary

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tables(head_dim: int, bound: int) -> ScopeRotary:
    inv_freq = 1.0 / 500000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return ScopeRotary(inv_freq, 1.2, bound, DEVICE)


def queries(batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, q, D] laid out as attention hands them over: view(B, q, H, D).transpose(1, 2), fresh each call."""
    return torch.randn(batch, length, heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2)


def assert_rotates_like_reference(x: torch.Tensor, rotary: ScopeRotary, start: int) -> None:
    out = rotate(x, rotary.cos, rotary.sin, start)
    expected = rotary.rotate(x, start)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert torch.equal(expected, rotate_reference(x, rotary.cos, rotary.sin, start))
    # the same fp32 math; 1 ulp for the final rounding (the interpreter truncates fp32 -> bf16), and on CUDA a few
    # fp32 ulps where PyTorch's addcmul_ rounds x2*sin before adding (see tests/kernels/test_gather.py)
    up = torch.nextafter(expected, torch.full_like(expected, float("inf"))) - expected
    down = expected - torch.nextafter(expected, torch.full_like(expected, float("-inf")))
    slack = 2e-6 if DEVICE.type == "cuda" else 0.0
    assert ((out - expected).abs().float() <= torch.maximum(up, down).float() + slack).all()


@pytest.mark.parametrize("batch,heads,length,head_dim,dtype,start", [
    (1, 9, 1, 64, torch.bfloat16, 4095),  # a decode step of SmolLM2's shape, at the last position
    (2, 9, 37, 64, torch.float32, 100),  # ragged chunk, 9 heads
    (1, 32, 64, 128, torch.bfloat16, 0),
    (2, 4, 130, 128, torch.float16, 7),  # two tiles
])
def test_matches_scope_rotary(batch, heads, length, head_dim, dtype, start):
    assert_rotates_like_reference(queries(batch, heads, length, head_dim, dtype), tables(head_dim, 4096), start)


def test_contiguous_input_and_an_empty_chunk():
    rotary = tables(64, 256)
    assert_rotates_like_reference(torch.randn(1, 3, 20, 64, device=DEVICE), rotary, 5)
    assert rotate(torch.randn(1, 3, 0, 64, device=DEVICE), rotary.cos, rotary.sin, 5).shape == (1, 3, 0, 64)


@pytest.mark.parametrize("x,start,message", [
    (lambda: torch.randn(3, 20, 64, device=DEVICE), 0, "must be \\[B, H, q, D\\]"),
    (lambda: torch.randn(1, 3, 20, 64, device=DEVICE).to(torch.int32), 0, "must be \\[B, H, q, D\\]"),
    (lambda: torch.randn(1, 3, 64, 20, device=DEVICE).transpose(2, 3), 0, "unit stride"),
    (lambda: torch.randn(1, 3, 20, 32, device=DEVICE), 0, "cos must be a contiguous \\[bound, 32\\]"),
    (lambda: torch.randn(1, 3, 20, 64, device=DEVICE), 240, "leave the tables' 256 positions"),
    (lambda: torch.randn(1, 3, 20, 64, device=DEVICE), -1, "leave the tables"),
])
def test_bad_input_raises(x, start, message):
    rotary = tables(64, 256)
    with pytest.raises(ValueError, match=message):
        rotate(x(), rotary.cos, rotary.sin, start)


@needs_cuda
def test_full_size_matches_reference():
    rotary = tables(128, 8192)
    assert_rotates_like_reference(queries(1, 32, 512, 128, torch.bfloat16), rotary, 8160 - 512)
    assert_rotates_like_reference(queries(4, 9, 512, 64, torch.bfloat16), tables(64, 4096), 4096 - 512)
