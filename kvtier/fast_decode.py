"""The static-shape decode step: what a decode step does when nothing but its own token changes the scope, written so
that it launches the same kernels on the same buffers every step (kvtier.graphs captures it in a CUDA graph).

A decode step that seals no span and reuses its layer's last selection (a policy's `reuses_selection`, e.g.
`consensus` between re-scorings) sees the previous step's scope with one token more at its end: `[global | the same
spans | local window + the new token]`, the new token at scope position L (the previous scope's length), the query
there too. So each layer keeps its last decode step's rotated scope in a buffer of the scope's bound (`FastScope`),
and the step writes the new token's K/V into the local window and its rotated key into the scope at indices read from
device memory (`Counters`), then attends to the positions below L + 1 of the whole buffer: the shapes and addresses
never change, the host only says where the token goes. On the kernel path (kvtier.dispatch) a flash-decoding Triton
kernel reads that length from the device and only the keys below it (kvtier.kernels.decode_attention); otherwise SDPA
attends over the buffer with a mask of those positions.

Equal to the eager step up to floating-point order: the same rotation and the same keys and values, attended over a
buffer of the bound instead of a tensor of exactly L + 1 keys."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kvtier import dispatch
from kvtier.buffers import buffer, upload
from kvtier.rotary import ScopeRotary


class FastScope:
    """One layer's last decode-step scope, rotated, in buffers of the scope's bound, and whether it is still that
    layer's scope (a prefill chunk, a seal or a re-selection makes the next step eager, which keeps a new one)."""

    def __init__(self, batch: int, kv_heads: int, bound: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        # [B, Hkv, bound, D] rotated; zeros, never garbage: the masked positions are read too, and a NaN there (an
        # uninitialised bf16) would survive the mask (NaN - inf) and the softmax's zero weight (0 * NaN)
        self.keys = buffer((batch, kv_heads, bound, head_dim), dtype, device, zeroed=True)
        self.values = buffer(self.keys.shape, dtype, device, zeroed=True)
        self.length = 0  # the scope's length L; valid only while `current`
        self.current = False

    def keep(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """An eager decode step's scope: rotated keys, values [B, Hkv, L, D]."""
        length = keys.shape[2]
        self.keys[:, :, :length].copy_(keys)
        self.values[:, :, :length].copy_(values)
        self.length, self.current = length, True


class Counters:
    """Where each layer's fast step writes, on the device: [layers, 3] int64 of (local window slot, scope position,
    the policy's query slot or 0), refreshed from the host before every fast step."""

    LOCAL, SCOPE, QUERY = 0, 1, 2

    def __init__(self, layers: int, device: torch.device):
        self.device = device
        self.table = buffer((layers, 3), torch.long, device)

    def set(self, rows: np.ndarray) -> None:
        """rows [layers, 3] int64 on the host; copied without waiting for the device."""
        self.table.copy_(upload(rows, self.device))

    def of(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer's (local slot, scope position, query slot), each [1] on the device."""
        row = self.table[layer]
        return row[self.LOCAL:self.LOCAL + 1], row[self.SCOPE:self.SCOPE + 1], row[self.QUERY:self.QUERY + 1]


def fast_attention(scope: FastScope, local_keys: torch.Tensor, local_values: torch.Tensor, rotary: ScopeRotary,
                   query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   slots: tuple[torch.Tensor, torch.Tensor], scaling: float | None, use_kernel: bool) -> torch.Tensor:
    """The static step of one layer: the new token's pre-RoPE K/V [B, Hkv, 1, D] go into the local window's buffers
    at slot slots[0] and, the key rotated, into the scope at position slots[1]; query [B, Hq, 1, D] pre-RoPE, rotated
    there, attends to scope positions 0..slots[1] -> [B, 1, Hq, D]: through the Triton decode kernel when use_kernel
    (kvtier.dispatch.decode_attention, which reads only those positions), else SDPA over the masked buffer."""
    local_slot, position = slots
    local_keys.index_copy_(2, local_slot, keys)
    local_values.index_copy_(2, local_slot, values)
    scope.keys.index_copy_(2, position, rotary.rotate_at(keys, position))
    scope.values.index_copy_(2, position, values)
    rotated = rotary.rotate_at(query, position)  # [B, Hq, 1, D]
    if use_kernel:
        return dispatch.decode_attention(rotated, scope.keys, scope.values, position + 1, scaling)
    batch, q_heads, _, head_dim = query.shape
    kv_heads, bound = scope.keys.shape[1], scope.keys.shape[2]
    rows = rotated.view(batch, kv_heads, q_heads // kv_heads, head_dim)  # [B, Hkv, g, D]
    visible = (torch.arange(bound, device=query.device) <= position)[None]  # [1, bound]
    out = F.scaled_dot_product_attention(rows, scope.keys, scope.values, attn_mask=visible, scale=scaling)
    return out.reshape(batch, 1, q_heads, head_dim)
