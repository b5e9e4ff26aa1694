"""Scope gather: one launch per layer writes `[global | selected spans | local]` K/V [B, Hkv, L, D], keys rotated at
positions 0..L-1, reading each span from the GPU slot pool or straight from pinned host blocks (UVA zero-copy).

Span locations `loc` [B, Hkv, k] int64: a slot >= 0 is a row of the GPU pool [P, 2, Hkv, S, D]; a slot < 0 is host
slot h = -slot - 1, row h % block_slots of host block h // block_slots, each block [block_slots, 2, Hkv, S, D]. The
kernel reaches the host blocks through a device table of their base addresses (int64), cast to pointers in-kernel.

The kernels take the sizes that change with the context or the step (region lengths, spans, loc's strides, the
batch, block_slots) as runtime integers (`do_not_specialize`), so a growing context compiles no new variant; the
K/V strides stay specialised: multiples of head_dim, fixed by the layout, their divisibility lets copies vectorise.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .rotary import _rotate_tile, rotate_reference

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TILE_ELEMENTS = 4096  # tokens x head_dim moved per program (K and V each)
COPY_BLOCK = 8192  # elements of a span copy_host_spans moves per program
ADDRESS_ALIGNMENT = tl.constexpr(16)  # bytes: host blocks start on this, so loads from them vectorise
TABLES_KEPT = 256  # address tables cached (a layer's block list that grew is a new entry)
_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()


@triton.jit
def _rotate_copy_tile(
    src_keys, src_values, src_row_stride, rows, valid, dst_keys, dst_values, dst_row_stride, positions, cos, sin,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Copy rows [BLOCK_T] of K and V (each row D = 2*HALF wide) from src to dst rows `positions`; keys rotated at
    `positions` (kernels.rotary._rotate_tile), values copied as they are."""
    _rotate_tile(src_keys, src_row_stride, rows, valid, dst_keys, dst_row_stride, positions, positions, cos, sin,
                 HALF, BLOCK_HALF)
    cols = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    mask = valid[:, None] & (cols < HALF)  # [BLOCK_T, BLOCK_HALF]
    src = rows.to(tl.int64)[:, None] * src_row_stride + cols
    dst = positions.to(tl.int64)[:, None] * dst_row_stride + cols
    tl.store(dst_values + dst, tl.load(src_values + src, mask=mask), mask=mask)
    tl.store(dst_values + dst + HALF, tl.load(src_values + src + HALF, mask=mask), mask=mask)


@triton.jit(do_not_specialize=["loc_stride_b", "loc_stride_h", "block_slots", "batch", "n_global", "n_spans",
                                "n_local"])
def _scope_gather_kernel(
    global_keys, global_values, global_stride_b, global_stride_h, global_stride_t,
    local_keys, local_values, local_stride_b, local_stride_h, local_stride_t,
    out_keys, out_values, out_stride_b, out_stride_h, out_stride_t,
    loc, loc_stride_b, loc_stride_h,
    pool, host_table, block_slots,
    cos, sin,
    batch, n_global, n_spans, n_local,
    HEADS: tl.constexpr, SPAN: tl.constexpr, HALF: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """One program = one tile of BLOCK_T scope tokens of one (row, KV head); heads vary fastest, then rows, so the
    programs sharing a tile's cos/sin rows run together. Tiles: global ones, then cdiv(S, BLOCK_T) per span, then local
    ones; a tile never straddles two regions."""
    tiles_per_span = (SPAN + BLOCK_T - 1) // BLOCK_T
    slot_elements = 2 * HEADS * SPAN * 2 * HALF  # [2, Hkv, S, D]
    pid = tl.program_id(0)
    head = (pid % HEADS).to(tl.int64)
    row = (pid // HEADS % batch).to(tl.int64)
    tile = pid // HEADS // batch
    tokens = tl.arange(0, BLOCK_T)
    out_k = out_keys + row * out_stride_b + head * out_stride_h
    out_v = out_values + row * out_stride_b + head * out_stride_h
    global_tiles = tl.cdiv(n_global, BLOCK_T)
    span_tiles = n_spans * tiles_per_span
    if tile < global_tiles:
        rows = tile * BLOCK_T + tokens
        offset = row * global_stride_b + head * global_stride_h
        _rotate_copy_tile(
            global_keys + offset, global_values + offset, global_stride_t, rows, rows < n_global,
            out_k, out_v, out_stride_t, rows, cos, sin, HALF, BLOCK_HALF,
        )
    elif tile < global_tiles + span_tiles:
        span = (tile - global_tiles) // tiles_per_span
        rows = (tile - global_tiles) % tiles_per_span * BLOCK_T + tokens
        slot = tl.load(loc + row * loc_stride_b + head * loc_stride_h + span)
        if slot >= 0:
            slot_base = pool + slot * slot_elements
        else:
            host_slot = -slot - 1
            block_address = tl.load(host_table + host_slot // block_slots)
            # the alignment hint goes on the pointer: on the int64 it does not survive the cast (scalar loads)
            block = tl.multiple_of(block_address.to(tl.pointer_type(pool.dtype.element_ty)), ADDRESS_ALIGNMENT)
            slot_base = block + host_slot % block_slots * slot_elements
        head_base = slot_base + head * SPAN * 2 * HALF
        _rotate_copy_tile(
            head_base, head_base + HEADS * SPAN * 2 * HALF, 2 * HALF, rows, rows < SPAN,
            out_k, out_v, out_stride_t, n_global + span * SPAN + rows, cos, sin, HALF, BLOCK_HALF,
        )
    else:
        rows = (tile - global_tiles - span_tiles) * BLOCK_T + tokens
        offset = row * local_stride_b + head * local_stride_h
        _rotate_copy_tile(
            local_keys + offset, local_values + offset, local_stride_t, rows, rows < n_local,
            out_k, out_v, out_stride_t, n_global + n_spans * SPAN + rows, cos, sin, HALF, BLOCK_HALF,
        )


def scope_gather(
    global_kv: tuple[torch.Tensor, torch.Tensor],
    local_kv: tuple[torch.Tensor, torch.Tensor],
    gpu_pool: torch.Tensor,
    host_blocks: Sequence[torch.Tensor],
    loc: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out_keys: torch.Tensor,
    out_values: torch.Tensor,
) -> None:
    """Write the scope into out_keys/out_values [B, Hkv, L, D]: `[global | the k spans of loc, in loc's order | local]`,
    keys rotated at positions 0..L-1, values copied. One launch; raises ValueError on inconsistent inputs (host
    blocks are checked when their address table is built, see host_block_table)."""
    _validate(global_kv, local_kv, gpu_pool, host_blocks, loc, cos, sin, out_keys, out_values)
    table = host_block_table(host_blocks, gpu_pool)
    (global_keys, global_values), (local_keys, local_values) = global_kv, local_kv
    batch, heads, length, head_dim = out_keys.shape
    n_global, n_local, n_spans, span = global_keys.shape[2], local_keys.shape[2], loc.shape[2], gpu_pool.shape[3]
    if length == 0:
        return
    block_tokens = min(triton.next_power_of_2(span), max(1, TILE_ELEMENTS // head_dim))
    tiles = triton.cdiv(n_global, block_tokens) + n_spans * triton.cdiv(span, block_tokens)
    tiles += triton.cdiv(n_local, block_tokens)
    block_slots = host_blocks[0].shape[0] if host_blocks else 1
    _scope_gather_kernel[(tiles * batch * heads,)](
        global_keys, global_values, *global_keys.stride()[:3],
        local_keys, local_values, *local_keys.stride()[:3],
        out_keys, out_values, *out_keys.stride()[:3],
        loc, *loc.stride()[:2],
        gpu_pool, table, block_slots,
        cos, sin,
        batch, n_global, n_spans, n_local,
        HEADS=heads, SPAN=span, HALF=head_dim // 2,
        BLOCK_T=block_tokens, BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        enable_fp_fusion=False,  # only the explicit fma: x*cos stays rounded on its own, as in PyTorch
    )


@triton.jit(do_not_specialize=["block_slots", "n_spans"])
def _copy_host_spans_kernel(pool, host_table, block_slots, slots, n_spans, SLOT: tl.constexpr, BLOCK: tl.constexpr):
    """Program (span i, part): elements [part*BLOCK, +BLOCK) of host slot slots[1, i] -> pool slot slots[0, i]."""
    span = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < SLOT
    pool_slot = tl.load(slots + span)
    host_slot = tl.load(slots + n_spans + span)
    block_address = tl.load(host_table + host_slot // block_slots)
    block = tl.multiple_of(block_address.to(tl.pointer_type(pool.dtype.element_ty)), ADDRESS_ALIGNMENT)
    rows = tl.load(block + host_slot % block_slots * SLOT + offsets, mask=mask)
    tl.store(pool + pool_slot * SLOT + offsets, rows, mask=mask)


def copy_host_spans(gpu_pool: torch.Tensor, host_blocks: Sequence[torch.Tensor], slots: torch.Tensor) -> None:
    """For each column i of slots [2, N] int64 (on the pool's device): gpu_pool[slots[0, i]] = host slot slots[1, i]
    (row h % block_slots of block h // block_slots), read in place from the pinned blocks through UVA - one launch,
    no staging copy on the CPU. The caller keeps those host slots unchanged until the launch has run."""
    _validate_copy(gpu_pool, host_blocks, slots)
    if not slots.shape[1]:
        return
    table = host_block_table(host_blocks, gpu_pool)
    slot_elements = gpu_pool[0].numel()
    block = min(COPY_BLOCK, triton.next_power_of_2(slot_elements))
    _copy_host_spans_kernel[(slots.shape[1], triton.cdiv(slot_elements, block))](
        gpu_pool, table, host_blocks[0].shape[0], slots, slots.shape[1], SLOT=slot_elements, BLOCK=block,
    )


def copy_host_spans_reference(gpu_pool: torch.Tensor, host_blocks: Sequence[torch.Tensor], slots: torch.Tensor) -> None:
    """copy_host_spans in PyTorch: index the concatenated host blocks, copy to the device, index_copy into the pool."""
    _validate_copy(gpu_pool, host_blocks, slots)
    if slots.shape[1]:
        rows = torch.cat(list(host_blocks))[slots[1].cpu()].to(gpu_pool.device)  # [N, 2, Hkv, S, D]
        gpu_pool.index_copy_(0, slots[0], rows)


def _validate_copy(gpu_pool, host_blocks, slots) -> None:
    if gpu_pool.dim() != 5 or not gpu_pool.is_contiguous() or gpu_pool.dtype not in DTYPES:
        raise ValueError(f"gpu_pool must be a contiguous [P, 2, Hkv, S, D] tensor of {DTYPES}, got "
                         f"{tuple(gpu_pool.shape)} {gpu_pool.dtype}")
    if slots.dim() != 2 or slots.shape[0] != 2 or slots.dtype is not torch.int64 or slots.device != gpu_pool.device:
        raise ValueError(f"slots must be [2, N] int64 (pool slots, host slots) on {gpu_pool.device}, got "
                         f"{tuple(slots.shape)} {slots.dtype} on {slots.device}")
    if not slots.is_contiguous():
        raise ValueError("slots must be contiguous")
    if slots.shape[1] and not host_blocks:
        raise ValueError("slots name host slots, but there are no host blocks")


def host_block_table(host_blocks: Sequence[torch.Tensor], gpu_pool: torch.Tensor) -> torch.Tensor:
    """The blocks' base addresses -> [max(n, 1)] int64 on the pool's device. Blocks are validated, and the table
    uploaded, once per (addresses, block layout): a call with the same blocks costs a dict lookup."""
    addresses = tuple(block.data_ptr() for block in host_blocks)
    key = (addresses, tuple(host_blocks[0].shape) if host_blocks else (), gpu_pool.dtype, gpu_pool.device)
    table = _tables.get(key)
    if table is None:
        _validate_host_blocks(host_blocks, gpu_pool)
        table = torch.tensor(addresses or (0,), dtype=torch.int64, device=gpu_pool.device)
        _tables[key] = table
        if len(_tables) > TABLES_KEPT:
            _tables.popitem(last=False)
    _tables.move_to_end(key)
    return table


def scope_gather_reference(
    global_kv: tuple[torch.Tensor, torch.Tensor],
    local_kv: tuple[torch.Tensor, torch.Tensor],
    gpu_pool: torch.Tensor,
    host_blocks: Sequence[torch.Tensor],
    loc: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out_keys: torch.Tensor,
    out_values: torch.Tensor,
) -> None:
    """scope_gather in PyTorch: index the pool, gather the host rows, rotate with kvtier.rotary's fp32 math."""
    (global_keys, global_values), (local_keys, local_values) = global_kv, local_kv
    heads, device = loc.shape[1], gpu_pool.device
    if host_blocks:
        host = torch.cat(list(host_blocks)).to(device)  # [H, 2, Hkv, S, D]
        slots = torch.cat((gpu_pool, host))  # host slot h at index P + h
        indices = torch.where(loc >= 0, loc, gpu_pool.shape[0] - loc - 1)
    else:
        slots, indices = gpu_pool, loc
    spans = slots[indices, :, torch.arange(heads, device=device)[None, :, None]]  # [B, Hkv, k, 2, S, D]
    keys = torch.cat((global_keys, spans[:, :, :, 0].flatten(2, 3), local_keys), dim=2)  # [B, Hkv, L, D]
    values = torch.cat((global_values, spans[:, :, :, 1].flatten(2, 3), local_values), dim=2)
    out_keys.copy_(rotate_reference(keys, cos, sin))
    out_values.copy_(values)


def _validate(global_kv, local_kv, gpu_pool, host_blocks, loc, cos, sin, out_keys, out_values) -> None:
    pool_shape, dtype, device = gpu_pool.shape, gpu_pool.dtype, gpu_pool.device
    if len(pool_shape) != 5 or pool_shape[1] != 2:
        raise ValueError(f"gpu_pool must be [P, 2, Hkv, S, D], got shape {tuple(pool_shape)}")
    slots, _, heads, span, head_dim = pool_shape
    if dtype not in DTYPES:
        raise ValueError(f"gpu_pool dtype must be one of {DTYPES}, got {dtype}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (half-split rotary), got {head_dim}")
    if not gpu_pool.is_contiguous():
        raise ValueError("gpu_pool must be contiguous (span-major slots)")
    loc_shape = loc.shape
    if len(loc_shape) != 3 or loc.dtype is not torch.int64 or loc.device != device:
        raise ValueError(f"loc must be [B, Hkv, k] int64 on {device}, got {tuple(loc_shape)} {loc.dtype} on {loc.device}")
    batch, loc_heads, n_spans = loc_shape
    if loc_heads != heads:
        raise ValueError(f"loc has {loc_heads} heads, gpu_pool has {heads}")
    for name, (keys, values) in (("global_kv", global_kv), ("local_kv", local_kv), ("out", (out_keys, out_values))):
        shape, strides = keys.shape, keys.stride()
        if values.shape != shape or values.stride() != strides:
            raise ValueError(f"{name}: keys and values must share shape and strides")
        if len(shape) != 4 or shape[0] != batch or shape[1] != heads or shape[3] != head_dim:
            raise ValueError(f"{name} tensors must be [{batch}, {heads}, tokens, {head_dim}], got {tuple(shape)}")
        if strides[3] != 1:
            raise ValueError(f"{name} tensors need unit stride along head_dim, got strides {strides}")
        if keys.dtype is not dtype or values.dtype is not dtype or keys.device != device or values.device != device:
            raise ValueError(f"{name} must be {dtype} on {device} like gpu_pool, got {keys.dtype} on {keys.device}")
    length = global_kv[0].shape[2] + n_spans * span + local_kv[0].shape[2]
    if out_keys.shape[2] != length:
        raise ValueError(f"out has {out_keys.shape[2]} tokens, but global + k*S + local = {length}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != head_dim or table.dtype is not torch.float32 or table.device != device:
            raise ValueError(f"{name} must be [bound, {head_dim}] float32 on {device}, got {tuple(table.shape)} "
                             f"{table.dtype} on {table.device}")
        if not table.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if table.shape[0] < length:
            raise ValueError(f"{name} covers {table.shape[0]} positions, the scope needs {length}")
    if loc.device.type == "cpu" and n_spans:  # on a GPU the range check would cost a sync
        host_slots = len(host_blocks) * (host_blocks[0].shape[0] if host_blocks else 0)
        low, high = int(loc.min()), int(loc.max())
        if high >= slots or low < -host_slots:
            raise ValueError(f"loc must lie in [-{host_slots}, {slots}): got [{low}, {high}]")


def _validate_host_blocks(host_blocks: Sequence[torch.Tensor], gpu_pool: torch.Tensor) -> None:
    slot_shape = gpu_pool.shape[1:]
    for block in host_blocks:
        if block.dim() != 5 or block.shape[1:] != slot_shape or block.shape != host_blocks[0].shape:
            raise ValueError(f"host blocks must all be [block_slots, {', '.join(map(str, slot_shape))}], "
                             f"got {tuple(block.shape)}")
        if block.dtype != gpu_pool.dtype or block.device.type != "cpu" or not block.is_contiguous():
            raise ValueError(f"host blocks must be contiguous {gpu_pool.dtype} CPU tensors, "
                             f"got {block.dtype} on {block.device}")
        if gpu_pool.is_cuda and not block.is_pinned():
            raise ValueError("host blocks must be pinned when the pool is on CUDA (the kernel reads them over UVA)")
        if block.data_ptr() % ADDRESS_ALIGNMENT.value:
            raise ValueError(f"host blocks must start on a {ADDRESS_ALIGNMENT.value}-byte boundary")
