"""Span summaries in one launch for all spans sealed in a step: keys [N, Hkv, S, D] -> [N, Hkv, c, D], keys' dtype.

  - "mean" (c = 1): the fp32 mean key, as the `mean` policy;
  - "minmax" (c = 2): [per-channel min, per-channel max], as the `quest` policy;
  - "representatives" (c = min(r, S)): the r keys whose fp32 dot product with the span's fp32 mean key is largest
    (ties to the lower position), in position order, as the `infllm` policy.

One compiled variant per model and method: the span count only sizes the grid, and the kernel's integer arguments
are strides fixed by the layer's span layout (multiples of head_dim), so specialising on them never recompiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtier.policies import InfLLMPolicy, MeanPolicy, QuestPolicy

METHODS = ("mean", "minmax", "representatives")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _summarise_kernel(
    keys, keys_stride_n, keys_stride_h, keys_stride_s,
    out, out_stride_n, out_stride_h, out_stride_c,
    HEADS: tl.constexpr, SPAN: tl.constexpr, DIM: tl.constexpr, COUNT: tl.constexpr, METHOD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program = one (span, KV head): its S keys [BLOCK_S, BLOCK_D] in fp32 -> COUNT summary rows."""
    pid = tl.program_id(0)
    span_keys = keys + (pid // HEADS).to(tl.int64) * keys_stride_n + (pid % HEADS) * keys_stride_h
    summary = out + (pid // HEADS).to(tl.int64) * out_stride_n + (pid % HEADS) * out_stride_h
    positions = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    valid = positions < SPAN
    mask = valid[:, None] & (cols < DIM)[None, :]
    x = tl.load(span_keys + positions[:, None] * keys_stride_s + cols[None, :], mask=mask).to(tl.float32)
    dtype = out.dtype.element_ty
    if METHOD == "minmax":
        tl.store(summary + cols, tl.min(tl.where(mask, x, float("inf")), axis=0).to(dtype), mask=cols < DIM)
        tl.store(summary + out_stride_c + cols, tl.max(tl.where(mask, x, -float("inf")), axis=0).to(dtype),
                 mask=cols < DIM)
    else:
        centre = tl.sum(x, axis=0) / SPAN  # [BLOCK_D], masked rows load as 0
        if METHOD == "mean":
            tl.store(summary + cols, centre.to(dtype), mask=cols < DIM)
        else:
            closeness = tl.where(valid, tl.sum(x * centre[None, :], axis=1), -float("inf"))  # [BLOCK_S]
            # rank = how many keys come first: closer, or as close and earlier; the COUNT lowest ranks are picked
            ahead = (closeness[None, :] > closeness[:, None]) | (
                (closeness[None, :] == closeness[:, None]) & (positions[None, :] < positions[:, None])
            )  # [BLOCK_S (key), BLOCK_S (other key)]
            picked = valid & (tl.sum(ahead.to(tl.int32), axis=1) < COUNT)  # [BLOCK_S]
            earlier_picks = tl.sum((picked[None, :] & (positions[None, :] < positions[:, None])).to(tl.int32), axis=1)
            order = tl.arange(0, BLOCK_C)  # output row j holds the picked key with j picked keys before it
            is_row = picked[None, :] & (earlier_picks[None, :] == order[:, None])  # [BLOCK_C, BLOCK_S]
            picks = tl.sum(tl.where(is_row, positions[None, :], 0), axis=1)  # [BLOCK_C]
            row_mask = (order < COUNT)[:, None] & (cols < DIM)[None, :]
            rows = tl.load(span_keys + picks[:, None] * keys_stride_s + cols[None, :], mask=row_mask)
            tl.store(summary + order[:, None] * out_stride_c + cols[None, :], rows, mask=row_mask)


def summary_size(method: str, span: int, representatives: int) -> int:
    """c: rows per (span, KV head) that `method` keeps."""
    return {"mean": 1, "minmax": 2, "representatives": min(representatives, span)}[method]


def summarise_spans(keys: torch.Tensor, method: str, representatives: int = 4) -> torch.Tensor:
    """keys [N, Hkv, S, D] (pre-RoPE, unit stride along D) -> summaries [N, Hkv, c, D] in keys' dtype, one launch;
    raises ValueError on a bad method, shape, dtype or layout."""
    _validate(keys, method, representatives)
    n_spans, heads, span, head_dim = keys.shape
    count = summary_size(method, span, representatives)
    out = keys.new_empty(n_spans, heads, count, head_dim)  # [N, Hkv, c, D]
    if out.numel() == 0:
        return out
    _summarise_kernel[(n_spans * heads,)](
        keys, *keys.stride()[:3],
        out, *out.stride()[:3],
        HEADS=heads, SPAN=span, DIM=head_dim, COUNT=count, METHOD=method,
        BLOCK_S=triton.next_power_of_2(span), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_C=triton.next_power_of_2(count),
    )
    return out


def summarise_spans_reference(keys: torch.Tensor, method: str, representatives: int = 4) -> torch.Tensor:
    """summarise_spans through the policies' own `summarise`."""
    policy = {
        "mean": MeanPolicy(),
        "minmax": QuestPolicy(),
        "representatives": InfLLMPolicy(representatives=representatives),
    }[method]
    return policy.summarise(keys)


def _validate(keys: torch.Tensor, method: str, representatives: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "representatives" and (isinstance(representatives, bool) or not isinstance(representatives, int)
                                        or representatives < 1):
        raise ValueError(f"representatives must be a positive integer, got {representatives!r}")
    if keys.dim() != 4:
        raise ValueError(f"keys must be [N, Hkv, S, D], got shape {tuple(keys.shape)}")
    if keys.dtype not in DTYPES:
        raise ValueError(f"keys dtype must be one of {DTYPES}, got {keys.dtype}")
    if keys.shape[2] == 0:
        raise ValueError("keys must hold at least one token per span")
    if keys.stride(3) != 1:
        raise ValueError(f"keys need unit stride along head_dim, got strides {keys.stride()}")
