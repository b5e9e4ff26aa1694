"""Rotary embedding at scope positions: one launch rotates a chunk's queries [B, H, q, D] at positions start..start+q-1
(kvtier.rotary.ScopeRotary.rotate's math: x*cos in fp32, then one fused multiply-add with rotate_half(x)*sin, cast
back to x's dtype). `_rotate_tile` is shared with the scope gather, which rotates the keys it copies.

The kernel takes what changes with the step (heads, length, start) as runtime integers (`do_not_specialize`): one
compiled variant per dtype and head_dim.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TILE_ELEMENTS = 4096  # tokens x head_dim rotated per program


@triton.jit
def _rotate_tile(
    src, src_row_stride, rows, valid, dst, dst_row_stride, dst_rows, positions, cos, sin,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rows [BLOCK_T] of src (each D = 2*HALF wide) -> dst rows `dst_rows`, rotated at `positions` [BLOCK_T]:
    out = x*cos + rotate_half(x)*sin in fp32, rotate_half(x) = [-x2, x1], cast to dst's dtype. Rounded as
    kvtier.rotary's `(x*cos).addcmul_(...)` is in PyTorch: x*cos once, then one fused multiply-add."""
    cols = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    mask = valid[:, None] & (cols < HALF)  # [BLOCK_T, BLOCK_HALF]
    from_ = rows.to(tl.int64)[:, None] * src_row_stride + cols
    to = dst_rows.to(tl.int64)[:, None] * dst_row_stride + cols
    trig = positions.to(tl.int64)[:, None] * (2 * HALF) + cols
    x1 = tl.load(src + from_, mask=mask).to(tl.float32)
    x2 = tl.load(src + from_ + HALF, mask=mask).to(tl.float32)
    out1 = tl.fma(-x2, tl.load(sin + trig, mask=mask), x1 * tl.load(cos + trig, mask=mask))
    out2 = tl.fma(x1, tl.load(sin + trig + HALF, mask=mask), x2 * tl.load(cos + trig + HALF, mask=mask))
    tl.store(dst + to, out1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + to + HALF, out2.to(dst.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["heads", "length", "start"])
def _rotate_kernel(
    x, x_stride_b, x_stride_h, x_stride_t, out, out_stride_b, out_stride_h, out_stride_t, cos, sin,
    heads, length, start,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Program (tile of BLOCK_T rows, row b * heads + head)."""
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    head = (bh % heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    _rotate_tile(
        x + b * x_stride_b + head * x_stride_h, x_stride_t, rows, rows < length,
        out + b * out_stride_b + head * out_stride_h, out_stride_t, rows, start + rows, cos, sin, HALF, BLOCK_HALF,
    )


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
    """x [B, H, q, D] pre-RoPE (any strides, unit stride along D) -> a new contiguous [B, H, q, D] in x's dtype,
    rotated at positions start..start+q-1 of the tables cos/sin [bound, D] fp32. One launch."""
    _validate(x, cos, sin, start)
    batch, heads, length, head_dim = x.shape
    out = torch.empty((batch, heads, length, head_dim), dtype=x.dtype, device=x.device)  # [B, H, q, D]
    if out.numel() == 0:
        return out
    block_t = min(triton.next_power_of_2(length), max(1, TILE_ELEMENTS // head_dim))
    _rotate_kernel[(triton.cdiv(length, block_t), batch * heads)](
        x, *x.stride()[:3], out, *out.stride()[:3], cos, sin, heads, length, start,
        HALF=head_dim // 2, BLOCK_T=block_t, BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        enable_fp_fusion=False,  # only the explicit fma: x*cos stays rounded on its own, as in PyTorch
    )
    return out


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0) -> torch.Tensor:
    """x [B, H, L, D] -> rotated at positions start..start+L-1 (kvtier.rotary.ScopeRotary.rotate's math), in x's
    dtype."""
    cos, sin = cos[start : start + x.shape[-2]], sin[start : start + x.shape[-2]]  # [L, D]
    x32 = x.float()
    half = x32.shape[-1] // 2
    out = x32 * cos
    out[..., :half].addcmul_(x32[..., half:], sin[:, :half], value=-1.0)
    out[..., half:].addcmul_(x32[..., :half], sin[:, half:])
    return out.to(x.dtype)


def _validate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> None:
    if x.dim() != 4 or x.dtype not in DTYPES:
        raise ValueError(f"x must be [B, H, q, D] of {DTYPES}, got {tuple(x.shape)} {x.dtype}")
    head_dim = x.shape[3]
    if head_dim % 2 or x.stride(3) != 1:
        raise ValueError(f"x needs an even head_dim with unit stride, got {head_dim} with strides {x.stride()}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != head_dim or table.dtype is not torch.float32 or not table.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [bound, {head_dim}] float32 table, got {tuple(table.shape)} "
                             f"{table.dtype}")
        if table.device != x.device:
            raise ValueError(f"{name} is on {table.device}, x on {x.device}")
    if start < 0 or start + x.shape[2] > cos.shape[0]:
        raise ValueError(f"positions {start}..{start + x.shape[2] - 1} leave the tables' {cos.shape[0]} positions")
