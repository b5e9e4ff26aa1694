"""kernels.gather.scope_gather against its PyTorch reference: `[global | spans from the GPU pool or the host blocks |
local]`, keys rotated. On a CPU-only machine the kernel runs in Triton's interpreter (tests/conftest.py)."""
from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from kvtier.kernels.gather import (
    copy_host_spans,
    copy_host_spans_reference,
    host_block_table,
    scope_gather,
    scope_gather_reference,
)
from kvtier.kernels.rotary import rotate_reference
from kvtier.rotary import ScopeRotary

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@dataclasses.dataclass
class Scope:
    """The inputs of one scope_gather call, in its argument order, plus NaN-poisoned outputs."""

    global_kv: tuple[torch.Tensor, torch.Tensor]
    local_kv: tuple[torch.Tensor, torch.Tensor]
    gpu_pool: torch.Tensor
    host_blocks: list[torch.Tensor]
    loc: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    out_keys: torch.Tensor
    out_values: torch.Tensor

    def args(self) -> tuple:
        return tuple(getattr(self, field.name) for field in dataclasses.fields(self))


def make_scope(
    batch: int, heads: int, head_dim: int, span: int, n_spans: int, n_global: int, n_local: int, dtype: torch.dtype,
    pool_slots: int = 6, n_blocks: int = 3, block_slots: int = 4,
) -> Scope:
    """Random inputs laid out as kvtier holds them: global and local are token slices of larger buffers, loc mixes
    pool slots and host slots of every block (both kinds in each row once k >= 2)."""
    seed = zlib.crc32(repr((batch, heads, head_dim, span, n_spans, n_global, n_local, dtype, n_blocks)).encode())
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    global_buffer = rand(2, batch, heads, n_global + 3, head_dim).to(DEVICE)  # [2 (K, V), B, Hkv, G, D]
    local_buffer = rand(2, batch, heads, n_local + 11, head_dim).to(DEVICE)
    pool = rand(pool_slots, 2, heads, span, head_dim).to(DEVICE)  # [P, 2, Hkv, S, D]
    blocks = [rand(block_slots, 2, heads, span, head_dim) for _ in range(n_blocks)]  # [block_slots, 2, Hkv, S, D]
    if DEVICE.type == "cuda":
        blocks = [block.pin_memory() for block in blocks]
    host_slots = n_blocks * block_slots
    loc = torch.randint(-host_slots, pool_slots, (batch, heads, n_spans), generator=gen)  # [B, Hkv, k]
    if n_spans >= 2:
        loc[..., 0] = torch.randint(0, pool_slots, (batch, heads), generator=gen)
        loc[..., 1] = -torch.randint(1, host_slots + 1, (batch, heads), generator=gen) if host_slots else 0
    length = n_global + n_spans * span + n_local
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    rotary = ScopeRotary(inv_freq, 1.0, length + 5, DEVICE)
    out = torch.full((2, batch, heads, length, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    return Scope(
        global_kv=(global_buffer[0, :, :, :n_global], global_buffer[1, :, :, :n_global]),
        local_kv=(local_buffer[0, :, :, 7 : 7 + n_local], local_buffer[1, :, :, 7 : 7 + n_local]),
        gpu_pool=pool,
        host_blocks=blocks,
        loc=loc.to(DEVICE),
        cos=rotary.cos,
        sin=rotary.sin,
        out_keys=out[0],
        out_values=out[1],
    )


def assert_gathers_like_reference(scope: Scope) -> None:
    expected_keys, expected_values = torch.empty_like(scope.out_keys), torch.empty_like(scope.out_values)
    scope_gather_reference(*scope.args()[:-2], expected_keys, expected_values)
    scope_gather(*scope.args())
    keys, values, expected_keys = scope.out_keys.cpu(), scope.out_values.cpu(), expected_keys.cpu()
    assert not keys.isnan().any() and not values.isnan().any(), "an output element was not written"
    assert torch.equal(values, expected_values.cpu())
    # keys: the same fp32 math; 1 ulp for the final rounding (the interpreter truncates fp32 -> bf16). On CUDA
    # PyTorch's addcmul_ may round x2*sin before adding where the kernel fuses it: a few fp32 ulps apart.
    # Where x*cos and x2*sin nearly cancel, those fp32 ulps exceed one ulp of the small result: allow 2e-6 more.
    up = torch.nextafter(expected_keys, torch.full_like(expected_keys, float("inf"))) - expected_keys
    down = expected_keys - torch.nextafter(expected_keys, torch.full_like(expected_keys, float("-inf")))
    slack = 2e-6 if DEVICE.type == "cuda" else 0.0
    assert ((keys - expected_keys).abs().float() <= torch.maximum(up, down).float() + slack).all()


CASES = [  # batch, heads, head_dim, span, k, global, local, dtype, host blocks
    (2, 3, 64, 16, 5, 4, 37, torch.bfloat16, 3),
    (1, 8, 128, 32, 7, 0, 45, torch.float32, 3),
    (1, 3, 128, 64, 1, 4, 29, torch.bfloat16, 2),  # a span is two tiles
    (1, 8, 64, 64, 0, 4, 51, torch.float32, 3),  # no spans
    (2, 3, 64, 32, 7, 0, 83, torch.float32, 0),  # pool only; local spans three tiles
    (1, 8, 128, 16, 5, 4, 19, torch.bfloat16, 3),
    (1, 3, 64, 16, 1, 4, 13, torch.float16, 1),
    (1, 3, 64, 32, 1, 0, 0, torch.bfloat16, 2),  # spans only
    (1, 8, 64, 64, 7, 4, 70, torch.bfloat16, 5),
]


@pytest.mark.parametrize("batch,heads,head_dim,span,k,n_global,n_local,dtype,n_blocks", CASES)
def test_matches_reference(batch, heads, head_dim, span, k, n_global, n_local, dtype, n_blocks):
    scope = make_scope(batch, heads, head_dim, span, k, n_global, n_local, dtype, n_blocks=n_blocks)
    assert_gathers_like_reference(scope)


def test_empty_scope_is_a_no_op():
    scope = make_scope(1, 3, 64, 16, 0, 0, 0, torch.float32)
    scope_gather(*scope.args())
    assert scope.out_keys.shape[2] == 0


def test_rotate_reference_is_scope_rotary():
    inv_freq = 1.0 / 500000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    rotary = ScopeRotary(inv_freq, 1.3, 200, torch.device("cpu"))
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2, 3, 150, 64).to(dtype)
        assert torch.equal(rotate_reference(x, rotary.cos, rotary.sin), rotary.rotate(x, 0))


def test_host_block_table_is_built_once_per_block_list():
    scope = make_scope(1, 3, 64, 16, 1, 0, 0, torch.float32, n_blocks=4)
    addresses = [block.data_ptr() for block in scope.host_blocks]
    table = host_block_table(scope.host_blocks[:3], scope.gpu_pool)
    assert table.tolist() == addresses[:3]
    assert host_block_table(scope.host_blocks[:3], scope.gpu_pool) is table  # another list of the same blocks
    assert host_block_table(scope.host_blocks, scope.gpu_pool).tolist() == addresses  # the list grew


def misaligned(block: torch.Tensor) -> torch.Tensor:
    """A copy of `block` starting one element past an allocation's start (pinned like it)."""
    flat = torch.empty(block.numel() + 1, dtype=block.dtype, pin_memory=block.is_pinned())
    return flat[1:].view_as(block).copy_(block)


BAD_INPUTS = {
    r"gpu_pool must be \[P, 2, Hkv, S, D\]": lambda s: dataclasses.replace(s, gpu_pool=s.gpu_pool[:, 0]),
    "gpu_pool dtype": lambda s: dataclasses.replace(s, gpu_pool=s.gpu_pool.to(torch.float64)),
    "head_dim must be even": lambda s: dataclasses.replace(s, gpu_pool=s.gpu_pool[..., :63].contiguous()),
    "gpu_pool must be contiguous": lambda s: dataclasses.replace(s, gpu_pool=s.gpu_pool[:, :, :, ::2]),
    "loc must be": lambda s: dataclasses.replace(s, loc=s.loc.int()),
    "loc has 2 heads": lambda s: dataclasses.replace(s, loc=s.loc[:, :2]),
    "out has": lambda s: dataclasses.replace(s, out_keys=s.out_keys[:, :, 1:], out_values=s.out_values[:, :, 1:]),
    "out must be": lambda s: dataclasses.replace(s, out_keys=s.out_keys.float(), out_values=s.out_values.float()),
    "global_kv tensors must be": lambda s: dataclasses.replace(s, global_kv=tuple(x[:, :2] for x in s.global_kv)),
    "global_kv: keys and values": lambda s: dataclasses.replace(
        s, global_kv=(s.global_kv[0].contiguous(), s.global_kv[1])
    ),
    "local_kv tensors need unit stride": lambda s: dataclasses.replace(
        s, local_kv=tuple(torch.stack((x, x), -1)[..., 0] for x in s.local_kv)
    ),
    "cos covers": lambda s: dataclasses.replace(s, cos=s.cos[:10]),
    "sin must be": lambda s: dataclasses.replace(s, sin=s.sin.double()),
    "host blocks must all be": lambda s: dataclasses.replace(s, host_blocks=s.host_blocks + [s.host_blocks[0][:2]]),
    "host blocks must be contiguous": lambda s: dataclasses.replace(
        s, host_blocks=[block.half() for block in s.host_blocks]
    ),
    "16-byte boundary": lambda s: dataclasses.replace(s, host_blocks=[misaligned(block) for block in s.host_blocks]),
}


@pytest.mark.parametrize("message", list(BAD_INPUTS))
def test_bad_input_raises(message):
    scope = make_scope(1, 3, 64, 16, 3, 4, 9, torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        scope_gather(*BAD_INPUTS[message](scope).args())


@pytest.mark.skipif(torch.cuda.is_available(), reason="loc's range is checked only on the CPU (a GPU check syncs)")
@pytest.mark.parametrize("slot", [6, -13])
def test_slot_out_of_range_raises(slot):
    scope = make_scope(1, 3, 64, 16, 3, 4, 9, torch.bfloat16)  # 6 pool slots, 3 host blocks of 4 slots
    scope.loc[0, 1, 2] = slot
    with pytest.raises(ValueError, match="loc must lie in"):
        scope_gather(*scope.args())


@needs_cuda
@pytest.mark.gpu
def test_unpinned_host_block_raises():
    scope = make_scope(1, 3, 64, 16, 3, 4, 9, torch.bfloat16)
    scope.host_blocks[1] = scope.host_blocks[1].clone()  # pageable: not mapped for the device
    with pytest.raises(ValueError, match="must be pinned"):
        scope_gather(*scope.args())


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch,heads,head_dim,span,k,n_global,n_local,dtype,n_blocks",
    [
        (1, 8, 128, 32, 127, 32, 4093, torch.bfloat16, 8),  # Llama-3.1-8B shape, mixed pool / pinned host spans
        (4, 3, 64, 32, 63, 32, 2047, torch.bfloat16, 4),  # SmolLM2 shape, batch 4
        (1, 8, 128, 64, 40, 4, 1001, torch.float32, 0),  # pool only
    ],
)
def test_full_size_matches_reference(batch, heads, head_dim, span, k, n_global, n_local, dtype, n_blocks):
    scope = make_scope(
        batch, heads, head_dim, span, k, n_global, n_local, dtype, pool_slots=200, n_blocks=n_blocks, block_slots=64
    )
    assert all(block.is_pinned() for block in scope.host_blocks)
    assert_gathers_like_reference(scope)


# ---- copy_host_spans: promotion of host spans into the pool ------------------------------------------------------
def make_copy(heads: int, head_dim: int, span: int, dtype: torch.dtype, count: int, pool_slots: int = 9,
              n_blocks: int = 3, block_slots: int = 4, seed: int = 0):
    """(pool, host blocks, slots [2, count]): distinct pool slots, distinct host slots spread over the blocks."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((heads, head_dim, span, dtype, count, seed)).encode()))
    pool = torch.randn(pool_slots, 2, heads, span, head_dim, generator=gen).to(dtype).to(DEVICE)
    blocks = [torch.randn(block_slots, 2, heads, span, head_dim, generator=gen).to(dtype) for _ in range(n_blocks)]
    if DEVICE.type == "cuda":
        blocks = [block.pin_memory() for block in blocks]
    pool_ids = torch.randperm(pool_slots, generator=gen)[:count]
    host_ids = torch.randperm(n_blocks * block_slots, generator=gen)[:count]
    return pool, blocks, torch.stack((pool_ids, host_ids)).to(DEVICE)


@pytest.mark.parametrize("heads,head_dim,span,dtype,count", [
    (3, 64, 16, torch.bfloat16, 5),  # SmolLM2's 3 KV heads
    (2, 128, 32, torch.float32, 1),
    (8, 128, 64, torch.bfloat16, 9),  # every pool slot rewritten
    (3, 64, 16, torch.float16, 0),
])
def test_copy_host_spans_matches_reference(heads, head_dim, span, dtype, count):
    pool, blocks, slots = make_copy(heads, head_dim, span, dtype, count)
    before = pool.clone()
    expected = pool.clone()
    copy_host_spans_reference(expected, blocks, slots)
    copy_host_spans(pool, blocks, slots)
    assert torch.equal(pool.cpu(), expected.cpu())
    host = torch.cat(blocks)
    for pool_slot, host_slot in slots.cpu().T.tolist():
        assert torch.equal(pool[pool_slot].cpu(), host[host_slot])
    untouched = torch.ones(pool.shape[0], dtype=torch.bool)
    untouched[slots[0].cpu()] = False
    assert torch.equal(pool[untouched.to(DEVICE)].cpu(), before[untouched.to(DEVICE)].cpu())


@pytest.mark.parametrize("slots,message", [
    (torch.zeros(3, dtype=torch.int64), "slots must be \\[2, N\\]"),
    (torch.zeros(2, 3, dtype=torch.int32), "slots must be \\[2, N\\] int64"),
    (torch.zeros(3, 2, dtype=torch.int64).T, "slots must be contiguous"),
])
def test_copy_host_spans_bad_slots_raise(slots, message):
    pool, blocks, _ = make_copy(3, 64, 16, torch.bfloat16, 2)
    with pytest.raises(ValueError, match=message):
        copy_host_spans(pool, blocks, slots.to(DEVICE))


def test_copy_host_spans_without_blocks_raises():
    pool, _, slots = make_copy(3, 64, 16, torch.bfloat16, 2)
    with pytest.raises(ValueError, match="no host blocks"):
        copy_host_spans(pool, [], slots)


@needs_cuda
@pytest.mark.gpu
def test_copy_host_spans_full_size():
    pool, blocks, slots = make_copy(8, 128, 32, torch.bfloat16, 200, pool_slots=512, n_blocks=8, block_slots=64)
    assert all(block.is_pinned() for block in blocks)
    expected = pool.clone()
    copy_host_spans_reference(expected, blocks, slots)
    copy_host_spans(pool, blocks, slots)
    assert torch.equal(pool, expected)
