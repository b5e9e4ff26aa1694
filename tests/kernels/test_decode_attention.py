"""The static decode step's attention kernel (kvtier.kernels.decode_attention) against its reference, SDPA over the
masked buffer: within rounding, at lengths from one key to the bound, with NaN planted beyond the length (never read,
so never in the output), on views and with the splits beyond the length neither written nor read; its blocks static
for a bound; a tiny model's static decode steps on the kernel path (kernels="triton") giving the eager tokens; and on
a GPU the real shapes and a CUDA graph replayed at two lengths. Inputs are drawn fresh per test, seeded from its id."""
from __future__ import annotations


import pytest
import torch

from kvtier import ReAttentionCache
from kvtier.kernels import decode_attention as module
from kvtier.kernels.decode_attention import decode_attention, decode_attention_reference, decode_blocks
from tests.conftest import greedy, random_ids, tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOLERANCE = {  # (rtol, atol) against the reference: the output's own rounding, and the weights' in bf16 / fp16
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread", "cpu_cases_run_interpreted")


def _draw(gen, batch, kv_heads, group, bound, dim, dtype):
    """query [B, Hq, 1, D], keys and values [B, Hkv, bound, D] in dtype, drawn on gen's device."""
    device = gen.device
    query = torch.randn(batch, kv_heads * group, 1, dim, generator=gen, device=device).to(dtype)
    keys, values = (torch.randn(batch, kv_heads, bound, dim, generator=gen, device=device).to(dtype)
                    for _ in range(2))
    return query, keys, values


def _poisoned(buffer: torch.Tensor, length: int) -> torch.Tensor:
    """A copy of buffer [B, Hkv, bound, D] holding NaN at every position from length on."""
    out = buffer.clone()
    out[:, :, length:] = float("nan")
    return out


def _check(query, keys, values, length: int, scale=None, **blocks):
    """The kernel over buffers holding NaN beyond length against the reference over clean ones."""
    on_device = torch.tensor([length], device=query.device)
    out = decode_attention(query, _poisoned(keys, length), _poisoned(values, length), on_device, scale, **blocks)
    batch, q_heads, _, dim = query.shape
    assert out.shape == (batch, 1, q_heads, dim) and out.dtype == query.dtype and out.is_contiguous()
    rtol, atol = TOLERANCE[query.dtype]
    expected = decode_attention_reference(query, keys, values, on_device, scale)
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


# ---- against the reference ----------------------------------------------------------------------------------------
CASES = [  # batch, kv_heads, group, bound, dim, dtype, block_k, split_keys
    (1, 1, 1, 40, 16, torch.float32, None, None),  # one query head, one split
    (2, 2, 3, 100, 32, torch.bfloat16, 16, 32),  # a group of 3 (padded to 16 rows), 4 splits, the last one partial
    (1, 3, 4, 300, 16, torch.float16, 16, 48),  # 7 splits of 3 blocks
    (2, 3, 2, 77, 32, torch.float32, 16, 16),  # one block per split, a bound not a multiple of it
    (2, 1, 4, 300, 32, torch.bfloat16, None, None),  # the default split
]


@pytest.mark.parametrize("batch, kv_heads, group, bound, dim, dtype, block_k, split_keys", CASES,
                         ids=[f"B{c[0]}-{c[1]}x{c[2]}-n{c[3]}-D{c[4]}-{str(c[5])[6:]}" for c in CASES])
def test_matches_the_reference_from_one_key_to_the_bound(seed, batch, kv_heads, group, bound, dim, dtype, block_k,
                                                         split_keys):
    gen = torch.Generator().manual_seed(seed)
    query, keys, values = _draw(gen, batch, kv_heads, group, bound, dim, dtype)
    for length in sorted({1, 15, 17, bound // 2 + 1, bound - 1, bound}):  # within, across and at block ends
        _check(query, keys, values, length, block_k=block_k, split_keys=split_keys)


def test_a_given_scale_and_views_of_larger_buffers(seed):
    """The query as attention hands it over (a transpose of [B, 1, Hq, D]); keys and values the first bound
    positions of larger buffers, neither contiguous."""
    gen = torch.Generator().manual_seed(seed)
    query, keys, values = _draw(gen, 2, 2, 3, 64, 32, torch.float32)
    query = query.transpose(1, 2).contiguous().transpose(1, 2)
    keys, values = (torch.cat([x, x], dim=2).narrow(2, 0, 50) for x in (keys, values))
    assert not keys.is_contiguous() and query.stride(1) == 32
    _check(query, keys, values, 33, scale=0.3, block_k=16, split_keys=16)


def test_the_splits_beyond_the_length_are_neither_written_nor_read(seed, monkeypatch):
    """The scratch buffers (and the output) born full of NaN: any unwritten partial that the combine read would
    show."""
    gen = torch.Generator().manual_seed(seed)
    query, keys, values = _draw(gen, 1, 2, 2, 128, 16, torch.float32)
    empty = torch.empty

    def nan_empty(*shape, **kwargs):
        return empty(*shape, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", nan_empty)
    for length in (1, 20, 128):
        _check(query, keys, values, length, block_k=16, split_keys=16)


# ---- static blocks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bound, rows, group, dim", [
    (4096, 3, 3, 64), (8160, 8, 4, 128), (8160, 16, 4, 128), (8160, 1, 8, 128), (40, 1, 1, 16), (300, 6, 3, 32),
])
def test_blocks_cover_the_bound_in_whole_blocks_within_the_combine_tile(bound, rows, group, dim):
    """SmolLM2 and Llama-8B (batch 1 and 2; and a group of 8 as in Llama-70B), tiny shapes."""
    blocks = decode_blocks(bound, rows, group, dim)
    assert blocks.split_keys % blocks.block_k == 0 and blocks.block_k >= 16
    assert (blocks.n_splits - 1) * blocks.split_keys < bound <= blocks.n_splits * blocks.split_keys
    assert blocks.g_pad >= max(16, group) and blocks.d_pad >= max(16, dim)
    assert blocks.n_splits * blocks.d_pad <= module.COMBINE_TILE


def test_the_8b_shape_runs_about_target_programs():
    blocks = decode_blocks(8160, 8, 4, 128)
    assert blocks.n_splits * 8 >= module.TARGET_PROGRAMS // 2
    assert (blocks.block_k, blocks.split_keys, blocks.n_splits) == (64, 256, 32)


# ---- bad inputs ---------------------------------------------------------------------------------------------------
BAD = [
    ("query rank", dict(query=torch.randn(1, 4, 16)), r"query must be \[B, Hq, 1, D\]"),
    ("two queries", dict(query=torch.randn(1, 4, 2, 16)), r"query must be \[B, Hq, 1, D\]"),
    ("values shape", dict(values=torch.randn(1, 2, 9, 16)), "must be one shape"),
    ("heads", dict(query=torch.randn(1, 3, 1, 16)), "do not match query"),
    ("head_dim", dict(query=torch.randn(1, 4, 1, 32)), "do not match query"),
    ("dtype", dict(keys=torch.randn(1, 2, 8, 16).half()), "must be one dtype of"),
    ("float64", dict(query=torch.randn(1, 4, 1, 16).double()), "must be one dtype of"),
    ("length dtype", dict(length=torch.tensor([3], dtype=torch.int32)), r"length must be a \[1\] int64"),
    ("length shape", dict(length=torch.tensor(3)), r"length must be a \[1\] int64"),
    ("key stride", dict(keys=torch.randn(1, 2, 8, 32)[..., ::2]), "unit stride along head_dim"),
]


@pytest.mark.parametrize("change, message", [(c, m) for _, c, m in BAD], ids=[n for n, _, _ in BAD])
def test_decode_attention_rejects_bad_inputs(change, message):
    args = dict(query=torch.randn(1, 4, 1, 16), keys=torch.randn(1, 2, 8, 16), values=torch.randn(1, 2, 8, 16),
                length=torch.tensor([3]))
    with pytest.raises(ValueError, match=message):
        decode_attention(**{**args, **change})


def test_the_kernel_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        decode_attention(torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16),
                         torch.tensor([3]))


# ---- the static decode path on the kernel --------------------------------------------------------------------------
def test_static_steps_on_the_kernel_give_the_eager_tokens(monkeypatch):
    """kernels="triton": the static steps attend through the kernel (counted) and generate the eager steps' tokens."""
    calls = []
    attend = module.decode_attention
    monkeypatch.setattr(module, "decode_attention", lambda *args: calls.append(1) or attend(*args))
    scope = dict(global_size=8, span_size=8, top_k=3, local_size=32, chunk_size=16, policy="consensus",
                 kernels="triton")
    model, ids = tiny_model("llama"), random_ids(60)
    eager, static = ReAttentionCache(model, scope), ReAttentionCache(model, scope)
    static.decode_statically(capture=False)
    eager_tokens = greedy(model, ids, eager, new_tokens=20)
    assert not calls
    static_tokens = greedy(model, ids, static, new_tokens=20)
    assert static._graphs.steps["static"] > 10
    assert len(calls) == static._graphs.steps["static"] * model.config.num_hidden_layers
    assert torch.equal(static_tokens, eager_tokens)


# ---- full size, on the GPU ----------------------------------------------------------------------------------------
GPU_CASES = [  # batch, q_heads, kv_heads, dim, bound, lengths, dtype
    (1, 9, 3, 64, 4096, (1, 4000, 4096), torch.bfloat16),  # SmolLM2
    (1, 32, 8, 128, 8160, (1, 4000, 8160), torch.bfloat16),  # Llama-3.1-8B
    (2, 32, 8, 128, 8160, (1, 4000, 8160), torch.float16),
    (1, 32, 8, 128, 8160, (1, 4000, 8160), torch.float32),
]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("batch, q_heads, kv_heads, dim, bound, lengths, dtype", GPU_CASES,
                         ids=[f"B{c[0]}-{c[1]}x{c[2]}-D{c[3]}-n{c[4]}-{str(c[6])[6:]}" for c in GPU_CASES])
def test_full_size_decode_attention_on_gpu(seed, batch, q_heads, kv_heads, dim, bound, lengths, dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    query, keys, values = _draw(gen, batch, kv_heads, q_heads // kv_heads, bound, dim, dtype)
    for length in lengths:
        _check(query, keys, values, length)


@needs_cuda
@pytest.mark.gpu
def test_a_captured_call_replays_at_the_length_on_the_device(seed):
    """Llama-8B's shape, captured once, replayed after the length tensor (and the NaN beyond it) changed in place."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    query, keys, values = _draw(gen, 1, 8, 4, 8160, 128, torch.bfloat16)
    length = torch.tensor([8160], device="cuda")
    poisoned_keys, poisoned_values = keys.clone(), values.clone()
    decode_attention(query, poisoned_keys, poisoned_values, length)  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(query, poisoned_keys, poisoned_values, length)
    for n in (4000, 17):
        length.fill_(n)
        poisoned_keys.copy_(_poisoned(keys, n))
        poisoned_values.copy_(_poisoned(values, n))
        graph.replay()
        rtol, atol = TOLERANCE[torch.bfloat16]
        torch.testing.assert_close(out, decode_attention_reference(query, keys, values, length), rtol=rtol,
                                   atol=atol)
