"""Rotary embedding at scope positions: tables built in float64, rotation in float32, result in the model's dtype."""
from __future__ import annotations

import torch


class ScopeRotary:
    """cos/sin for positions 0..bound-1, built once: scope positions never reach the bound, so the tables never grow.

    `inv_freq` and `attention_scaling` come from the model's own rotary module (llama3 / yarn / linear scaling is
    already baked into them), so rotating at position p equals the model's rotary at p, minus its fp32 rounding.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, bound: int, device: torch.device):
        positions = torch.arange(bound, dtype=torch.float64, device=device)
        angles = positions[:, None] * inv_freq.to(device=device, dtype=torch.float64)[None, :]  # [bound, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [bound, D], HF's half-split layout
        self.cos = (angles.cos() * attention_scaling).float()  # [bound, D]
        self.sin = (angles.sin() * attention_scaling).float()
        self.bound = bound

    def check(self, start: int, length: int) -> None:
        """Positions start..start+length-1 lie below the bound (the scope never reaches it: a bug otherwise)."""
        if start < 0 or start + length > self.bound:
            raise AssertionError(f"rotary positions {start}..{start + length - 1} leave the scope bound {self.bound}")

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x [B, H, L, D] pre-RoPE -> x rotated at positions start..start+L-1, in x's dtype."""
        self.check(start, x.shape[-2])
        length = x.shape[-2]
        return _rotate(x, self.cos[start : start + length], self.sin[start : start + length])

    def rotate_at(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """x [B, H, 1, D] pre-RoPE -> rotated at `position`, a [1] int64 tensor on the tables' device (read there: the
        host never learns it, so a CUDA graph can replay this at any position below the bound)."""
        return _rotate(x, self.cos.index_select(0, position), self.sin.index_select(0, position))

    def rotate_rows(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [R, H, L, D] pre-RoPE -> each row r rotated at its own positions[r] ([R, L] int64 on the tables' device,
        all below the bound)."""
        return _rotate(x, self.cos[positions][:, None], self.sin[positions][:, None])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., L, D] pre-RoPE, cos / sin [..., L, D] fp32 (broadcast against x) -> x rotated, in x's dtype."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    out = x32 * cos  # + rotate_half(x) * sin, written in place: rotate_half(x) = [-x2, x1]
    out[..., :half].addcmul_(x32[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(x32[..., :half], sin[..., half:])
    return out.to(x.dtype)
