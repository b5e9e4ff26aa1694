"""Rotary at scope positions: float64 tables, equal to the model's own rotary at small positions."""
from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvtier import ReAttentionCache
from kvtier.rotary import ScopeRotary
from tests.conftest import tiny_model


def test_tables_are_built_in_float64():
    inv_freq = torch.tensor([0.7, 1e-4])
    rotary = ScopeRotary(inv_freq, 1.0, bound=2**20, device=torch.device("cpu"))
    position = 2**20 - 1
    exact = torch.tensor(position, dtype=torch.float64) * inv_freq.double()
    # fp32 angles at 1e6 are off by ~3e-2 rad; the fp64-built tables are exact to fp32 rounding of cos/sin
    assert torch.allclose(rotary.cos[position, :2].double(), exact.cos(), atol=1e-7)
    assert torch.allclose(rotary.sin[position, :2].double(), exact.sin(), atol=1e-7)
    fp32_angle = (torch.tensor(float(position)) * inv_freq[0]).float()
    assert (fp32_angle.cos() - exact[0].cos()).abs() > 1e-3  # the error the fp64 tables avoid


def test_rotation_equals_the_models_rotary_at_small_positions(family):
    model = tiny_model(family)
    cache = ReAttentionCache(model, global_size=4, local_size=32, span_size=4, top_k=2, chunk_size=8)
    rotary = cache._rotary_on(torch.device("cpu"))
    q, k = torch.randn(2, 6, 20, 16), torch.randn(2, 2, 20, 16)
    positions = torch.arange(3, 23)[None].expand(2, -1)
    cos, sin = model.get_decoder().rotary_emb(q, positions)  # the model's own (hooks inactive: no cache drives it)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(rotary.rotate(q, 3), q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotary.rotate(k, 3), k_ref, rtol=1e-5, atol=1e-5)


def test_rotation_keeps_the_input_dtype():
    rotary = ScopeRotary(torch.rand(8), 1.0, bound=64, device=torch.device("cpu"))
    x = torch.randn(1, 2, 10, 16, dtype=torch.bfloat16)
    out = rotary.rotate(x, 5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), rotary.rotate(x.float(), 5), rtol=1e-2, atol=1e-2)


def test_attention_scaling_is_applied():
    rotary = ScopeRotary(torch.rand(4), 0.5, bound=16, device=torch.device("cpu"))
    x = torch.randn(1, 1, 1, 8)
    torch.testing.assert_close(rotary.rotate(x, 0), 0.5 * x)


def test_rows_rotated_at_their_own_positions_equal_each_row_rotated_alone():
    rotary = ScopeRotary(1.0 / 10000 ** (torch.arange(0, 16, 2) / 16), 1.0, 64, torch.device("cpu"))
    x = torch.randn(3, 2, 5, 16)
    starts = [0, 7, 59]
    positions = torch.tensor([[start + offset for offset in range(5)] for start in starts])
    rotated = rotary.rotate_rows(x, positions)
    for row, start in enumerate(starts):
        assert torch.equal(rotated[row : row + 1], rotary.rotate(x[row : row + 1], start))
