"""The tier store: placement never changes what the model generates, bytes really move through every tier, budgets
hold at every step, and the stores keep their promises (slots reused, a span dropped only once its copy is safe)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from kvtier import ReAttentionCache
from kvtier.allocator import PINNED_REGISTER, prefer_pinned_register, registers_pinned_pages
from kvtier.buffers import scratch_rows
from kvtier.config import ReAttentionConfig
from kvtier.errors import CorruptCacheError, TierFullError
from kvtier.tiers import DISK, GPU, HOST
from kvtier.tiers.base import SlotMap, SpanStore
from kvtier.tiers.disk import LmdbStore, put_records, span_key
from kvtier.tiers.disk_tier import DiskTier
from kvtier.tiers.host import AHEAD_BLOCKS, HostPool, contiguous_runs
from kvtier.tiers.lmdb_pages import file_offset
from kvtier.tiers.placement import Placement, shortfall
from kvtier.tiers.reserve import BlockReserve
from tests.conftest import greedy, random_ids, tiny_model

TINY = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)
SPAN_BYTES = 2 * 2 * 4 * 16 * 4  # K and V, 2 KV heads, 4 tokens, head_dim 16, float32
SPAN_SHAPE = (2, 2, 4, 16)


def _budgets(tmp_path, tier: str) -> dict:
    """Everything on the device, spilling to the host, or spilling through the host to LMDB."""
    if tier == "gpu":
        return {}
    small = {"gpu_budget": 24 * SPAN_BYTES}
    if tier == "host":
        return small
    return {**small, "host_budget": 24 * SPAN_BYTES, "disk_path": str(tmp_path / "spill")}


class _RecordStats(StoppingCriteria):
    """Reads cache.stats() after every forward of generate; never stops it."""

    def __init__(self, cache):
        self.cache, self.seen = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(self.cache.stats())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("policy", ["quest", "reattention"])
def test_placement_does_not_change_generated_tokens(tmp_path, policy):
    model = tiny_model("llama")
    ids = random_ids(260, batch=2, seed=3)
    outputs, stats = {}, {}
    for tier in ("gpu", "host", "disk"):
        cache = ReAttentionCache(model, policy=policy, **TINY, **_budgets(tmp_path, tier))
        outputs[tier] = greedy(model, ids, cache, new_tokens=48)
        stats[tier] = cache.stats()
        cache.close()
    assert torch.equal(outputs["host"], outputs["gpu"])
    assert torch.equal(outputs["disk"], outputs["gpu"])
    assert stats["gpu"]["moved"] == dict.fromkeys(stats["gpu"]["moved"], 0)
    assert stats["gpu"]["spans"]["host"] == stats["gpu"]["spans"]["disk"] == 0
    assert stats["gpu"]["tiers"]["gpu"]["hits"] > 0 and stats["gpu"]["tiers"]["gpu"]["misses"] == 0
    host = stats["host"]
    assert host["moved"]["gpu->host"] > 0 and host["moved"]["host->gpu"] > 0 and host["spans"]["host"] > 0
    assert host["tiers"]["host"]["hits"] > 0 and host["tiers"]["gpu"]["evictions"] > 0
    disk = stats["disk"]
    assert disk["moved"]["host->disk"] > 0 and disk["moved"]["disk->host"] > 0 and disk["spans"]["disk"] > 0
    assert disk["tiers"]["disk"]["hits"] > 0 and disk["tiers"]["host"]["promotions"] > 0
    total = sum(stats["gpu"]["spans"].values())
    assert sum(host["spans"].values()) == sum(disk["spans"].values()) == total  # no span lost or duplicated


def test_budgets_hold_at_every_step_of_a_long_generation(tmp_path):
    model = tiny_model("qwen2")
    budgets = {"gpu_budget": 20 * SPAN_BYTES, "host_budget": f"{24 * SPAN_BYTES}B",
               "disk_path": str(tmp_path), "disk_budget": 400 * SPAN_BYTES}
    cache = ReAttentionCache(model, **TINY, **budgets)
    recorder = _RecordStats(cache)
    greedy(model, random_ids(400, seed=5), cache, new_tokens=300, stopping_criteria=StoppingCriteriaList([recorder]))
    assert len(recorder.seen) == 300
    for stats in recorder.seen:
        assert stats["bytes"]["gpu"] <= 20 * SPAN_BYTES
        assert stats["bytes"]["host"] <= 24 * SPAN_BYTES
        assert stats["bytes"]["disk"] <= 400 * SPAN_BYTES
    last = recorder.seen[-1]
    assert last["spans"]["gpu"] <= 20 and last["spans"]["host"] <= 24
    assert last["spans"]["disk"] > 0.5 * sum(last["spans"].values())  # most of the middle really lives in LMDB
    cache.close()
    assert list(tmp_path.iterdir()) == []  # the spill file is scratch: removed on close


def test_a_budget_below_one_step_names_the_field():
    model = tiny_model("llama")
    cache = ReAttentionCache(model, **TINY, gpu_budget=SPAN_BYTES // 2)
    with pytest.raises(TierFullError, match=r"gpu_budget=512 bytes holds 0 spans.*raise gpu_budget"):
        greedy(model, random_ids(40), cache, new_tokens=1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"host_budget": "1GiB"}, "set disk_path"),
        ({"disk_budget": "1GiB"}, "disk_budget is set but disk_path is not"),
        ({"gpu_budget": "8 gigs"}, "gpu_budget='8 gigs' is not a size"),
        ({"gpu_budget": 0}, "gpu_budget must be positive"),
        ({"kernels": "fast"}, "kernels must be one of"),
    ],
)
def test_bad_placement_config_names_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        ReAttentionConfig(**fields).resolve(2048)


@pytest.mark.parametrize("write_slice_spans", [None, 1])
def test_fetch_returns_the_same_spans_wherever_they_live(tmp_path, monkeypatch, write_slice_spans):
    if write_slice_spans is not None:  # victims copied for the disk writer one span at a time
        monkeypatch.setattr("kvtier.tiers.copies.WRITE_SLICE_BYTES", write_slice_spans * SPAN_BYTES)
    config = ReAttentionConfig(gpu_budget=8 * SPAN_BYTES, host_budget=8 * SPAN_BYTES, disk_path=str(tmp_path))
    placement = Placement(config.resolve(2048), SPAN_SHAPE, torch.float32, torch.device("cpu"), step_spans=4)
    handed = []  # spans per LmdbStore.put call
    put = placement.disk.put
    monkeypatch.setattr(placement.disk, "put", lambda uids, rows: (handed.append(len(uids)), put(uids, rows)))
    spans = torch.randn(40, *SPAN_SHAPE)  # [N, 2, Hkv, S, D]
    for start in range(0, 40, 4):
        placement.add(spans[start : start + 4])
    tiers = placement.tier.data[:40]
    assert {GPU, HOST} <= set(tiers.tolist()) and (tiers == DISK).sum() + placement.disk.pending() > 0
    assert max(handed) == 1 if write_slice_spans == 1 else max(handed) > 1
    chosen = np.array([0, 3, 17, 21, 39])
    assert torch.equal(placement.fetch(chosen), spans[torch.from_numpy(chosen)])
    assert torch.equal(placement.read_spans(np.arange(40)), spans)
    placement.close()


def test_a_span_leaves_the_host_only_after_its_disk_write_committed(tmp_path):
    config = ReAttentionConfig(gpu_budget=4 * SPAN_BYTES, host_budget=4 * SPAN_BYTES, disk_path=str(tmp_path))
    placement = Placement(config.resolve(2048), SPAN_SHAPE, torch.float32, torch.device("cpu"), step_spans=2)
    spans = torch.randn(12, *SPAN_SHAPE)
    for start in range(0, 12, 2):
        placement.add(spans[start : start + 2])
        written = np.flatnonzero(placement.ledger.writing.data[: placement.uids])
        for uid in written.tolist():  # queued for disk, not yet committed: still held (and read) on the host
            assert placement.tier.data[uid] == HOST and placement.host.contains(uid)
    placement.disk.wait_any()
    placement.poll()
    on_disk = np.flatnonzero(placement.tier.data[:12] == DISK)
    assert len(on_disk) and all(placement.disk.contains(uid) and not placement.host.contains(uid) for uid in on_disk.tolist())
    chosen = on_disk[:2]  # one step's worth (step_spans=2)
    assert torch.equal(placement.fetch(chosen), spans[torch.from_numpy(chosen)])
    placement.close()


def test_slot_map_reuses_released_slots_lowest_first():
    slots = SlotMap(capacity=6)
    assert slots.assign(np.arange(5)).tolist() == [0, 1, 2, 3, 4]
    slots.release(np.array([3, 1]))
    assert slots.free_count() == 3
    assert slots.assign(np.array([10, 11, 12])).tolist() == [1, 3, 5]
    assert not slots.contains(1) and slots.lookup(np.array([12, 0])).tolist() == [5, 0]
    with pytest.raises(KeyError, match="not in this pool"):
        slots.lookup(np.array([3]))


def test_contiguous_runs_split_at_gaps_and_block_edges():
    slots = np.array([4, 5, 6, 7, 9, 10])
    blocks = np.array([0, 0, 1, 1, 1, 1])
    assert contiguous_runs(slots, blocks) == [(0, 2), (2, 4), (4, 6)]


@pytest.mark.parametrize("ahead", [0, 2])
def test_host_pool_round_trips_spans_across_blocks(monkeypatch, ahead):
    monkeypatch.setattr("kvtier.tiers.host.BLOCK_BYTES", 3 * SPAN_BYTES)
    pool = HostPool(SPAN_SHAPE, torch.float32, capacity=None, pinned=False, ahead=ahead)
    spans = torch.randn(20, *SPAN_SHAPE)
    pool.put(np.arange(20), spans)
    assert len(pool.blocks) == 7  # blocks of 3 spans
    assert len({block.data_ptr() for block in pool.blocks}) == 7  # each block its own memory
    if ahead:
        _wait_for(lambda: pool._reserve.ready == ahead)
    assert pool.nbytes == (7 + ahead) * 3 * SPAN_BYTES  # the blocks in use and those ready
    out = torch.full((5, *SPAN_SHAPE), float("nan"))
    chosen = np.array([19, 2, 3, 8, 0])
    pool.get_into(chosen, out)
    assert torch.equal(out, spans[torch.from_numpy(chosen)])


def test_block_reserve_hands_blocks_out_in_order_keeping_ahead_allocated():
    made = []

    def allocate():
        made.append(threading.current_thread().name)
        return torch.full((2,), float(len(made)))

    reserve = BlockReserve(allocate, ahead=3)
    assert [reserve.take()[0].item() for _ in range(5)] == [1, 2, 3, 4, 5]
    assert reserve.requested == 5 + 3  # the five taken and three ahead
    _wait_for(lambda: reserve.ready == 3)
    assert set(made) == {name for name in made if name.startswith("kvtier-host-blocks")}  # never on the caller's thread


def test_block_reserve_stops_at_its_limit_and_raises_an_allocation_error_where_the_block_is_taken():
    reserve = BlockReserve(lambda: torch.zeros(1), ahead=4, limit=3)
    [reserve.take() for _ in range(3)]
    assert reserve.requested == 3
    with pytest.raises(AssertionError, match="all 3 blocks"):
        reserve.take()  # a bounded pool never asks for more than its limit

    def failing():
        raise RuntimeError("cannot pin 256 MiB")

    with pytest.raises(RuntimeError, match="cannot pin"):
        BlockReserve(failing, ahead=1).take()
    with pytest.raises(ValueError, match="ahead=0"):
        BlockReserve(failing, ahead=0)


@pytest.mark.parametrize("before, after", [
    ({}, {"PYTORCH_CUDA_ALLOC_CONF": PINNED_REGISTER}),
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
     {"PYTORCH_CUDA_ALLOC_CONF": f"expandable_segments:True,{PINNED_REGISTER}"}),
    ({"PYTORCH_ALLOC_CONF": "expandable_segments:True"},
     {"PYTORCH_ALLOC_CONF": f"expandable_segments:True,{PINNED_REGISTER}"}),
    ({"PYTORCH_CUDA_ALLOC_CONF": "pinned_use_cuda_host_register:False"},
     {"PYTORCH_CUDA_ALLOC_CONF": "pinned_use_cuda_host_register:False"}),  # the user's choice stands
])
def test_the_kvtier_command_prefers_pinning_by_host_register_unless_told(before, after):
    environ = dict(before)
    prefer_pinned_register(environ)
    assert environ == after
    assert registers_pinned_pages(environ) == ("False" not in str(after))


def test_a_pinned_host_pool_reserves_blocks_ahead_only_where_pages_are_registered(monkeypatch):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", PINNED_REGISTER)
    assert HostPool(SPAN_SHAPE, torch.float32, None, pinned=True)._reserve.ahead == AHEAD_BLOCKS
    assert HostPool(SPAN_SHAPE, torch.float32, None, pinned=False)._reserve is None
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert HostPool(SPAN_SHAPE, torch.float32, None, pinned=True)._reserve is None


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_lmdb_store_reads_back_only_committed_spans(tmp_path):
    store = LmdbStore.spill(tmp_path, SPAN_SHAPE, torch.float32, budget=None)
    spans = torch.randn(6, *SPAN_SHAPE)
    store.put(np.arange(6), spans.clone())
    committed = store.wait_any()
    assert sorted(committed.tolist()) == list(range(6)) and all(store.contains(u) for u in range(6))
    out = torch.empty(3, *SPAN_SHAPE)
    store.get_into(np.array([5, 0, 2]), out)
    assert torch.equal(out, spans[[5, 0, 2]])
    store.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_each_span_is_its_own_record_and_a_damaged_one_fails_only_its_read(tmp_path, damage):
    """py-lmdb touches every page of a record it returns, so a span read must fetch its own record and no other."""
    store = LmdbStore.spill(tmp_path, SPAN_SHAPE, torch.float32, budget=None)
    spans = torch.randn(4, *SPAN_SHAPE)
    store.put(np.arange(4), spans.clone())
    store.wait_any()
    assert store.env.stat()["entries"] == 4
    with store.env.begin() as txn:
        value = bytearray(txn.get(span_key(2)))
    if damage == "flipped byte":
        value[-1] ^= 0xFF
        expected = "span 2 .*checksum mismatch"
    else:
        value = value[:-8]
        expected = "record 2.*payload's length does not match"
    put_records(store.env, [(span_key(2), bytes(value))], threading.Lock())
    out = torch.empty(2, *SPAN_SHAPE)
    store.get_into(np.array([3, 1]), out)
    assert torch.equal(out, spans[[3, 1]])
    with pytest.raises(CorruptCacheError, match=expected):
        store.get_into(np.array([2]), out[:1])
    store.close()


LARGE_SPAN_SHAPE = (2, 2, 32, 64)  # 32 KiB of float32: stored in LMDB overflow pages, as every real model's spans are


def test_lmdb_pages_finds_where_a_large_value_lies_in_the_file(tmp_path):
    import lmdb

    path = tmp_path / "values.lmdb"
    env = lmdb.open(str(path), subdir=False, map_size=2**24)
    large, small = np.random.default_rng(0).bytes(20_000), b"inline"
    with env.begin(write=True) as txn:
        txn.put(b"large", large)
        txn.put(b"small", small)
    env.sync(True)
    with env.begin(buffers=True) as txn:
        offset = file_offset(txn.get(b"large"), env.stat()["psize"])
        assert file_offset(txn.get(b"small"), env.stat()["psize"]) is None  # inside a leaf page: no fixed place
    assert path.read_bytes()[offset : offset + len(large)] == large
    env.close()


def test_spilled_spans_are_read_by_pread_of_their_own_record_and_verified(tmp_path):
    store = LmdbStore.spill(tmp_path, LARGE_SPAN_SHAPE, torch.float32, budget=None)
    spans = torch.randn(6, *LARGE_SPAN_SHAPE)
    store.put(np.arange(6), spans.clone())
    while store.pending():
        store.wait_any()
    offsets = store.offset_of.data[:6]
    assert (offsets >= 0).all() and len(set(offsets.tolist())) == 6
    out = torch.empty(3, *LARGE_SPAN_SHAPE)
    store.get_into(np.array([4, 0, 5]), out)
    assert torch.equal(out, spans[[4, 0, 5]])
    with open(store.path, "r+b") as file:  # damage the last byte of span 0's record in place
        file.seek(int(offsets[0] + store.length_of.data[0]) - 1)
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 0xFF]))
    store.get_into(np.array([1]), out[:1])
    assert torch.equal(out[0], spans[1])
    with pytest.raises(CorruptCacheError, match="span 0 .*checksum mismatch"):
        store.get_into(np.array([0]), out[:1])
    store.evict(np.array([2]))
    assert store.offset_of.data[2] == -1
    store.close()


def test_a_cache_filled_under_inference_mode_keeps_working_outside_it(tmp_path):
    """The cache's buffers are never inference tensors: a prefill under torch.inference_mode followed by generate
    (which runs under no_grad) updates them in place without error, in every tier, with the same tokens."""
    model = tiny_model("llama")
    ids = random_ids(200, seed=9)
    outputs = []
    for tier in ("gpu", "disk"):
        cache = ReAttentionCache(model, **TINY, **_budgets(tmp_path, tier))
        with torch.inference_mode():
            model(ids[:, :-1], past_key_values=cache)
        with torch.no_grad():
            out = model.generate(ids, past_key_values=cache, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        outputs.append(out[:, ids.shape[1] :])
        cache.close()
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("with_disk", [True, False], ids=["gpu+host+lmdb", "gpu+host"])
def test_the_kernel_path_generates_what_the_reference_path_generates(tmp_path, with_disk):
    """kernels="triton" (Triton's interpreter on this CPU, the real kernels on CUDA) through every tier: summaries,
    selection and the scope gather with host spans read in place give the reference path's tokens. Without a disk
    tier the kernel path finds spans through the placement's device table and books selections later."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama").to(device)
    ids = random_ids(90, seed=4).to(device)
    # 9 spans: what one step may need (top_k 3 + a chunk's 3 + the seal group's 3 more)
    budgets = {"gpu_budget": 9 * SPAN_BYTES, "host_budget": 9 * SPAN_BYTES, "disk_path": str(tmp_path)}
    new_tokens = 4
    if not with_disk:  # selections are booked a call late: run long enough for spans to move down and back up
        budgets, new_tokens = {"gpu_budget": 9 * SPAN_BYTES}, 12
    outputs, stats = [], []
    for kernels in ("reference", "triton"):
        cache = ReAttentionCache(model, **TINY, **budgets, kernels=kernels)
        outputs.append(greedy(model, ids, cache, new_tokens=new_tokens))
        stats.append(cache.stats())
        assert cache.placement.locates_on_device == (not with_disk)
        if not with_disk:
            assert_device_table_matches_the_placement(cache.placement)
        cache.close()
    assert torch.equal(outputs[0], outputs[1])
    assert stats[1]["tiers"]["host"]["hits"] > 0 and stats[1]["tiers"]["gpu"]["misses"] > 0
    assert stats[1]["tiers"]["gpu"]["promotions"] > 0  # host spans copied into the pool by kernels.copy_host_spans
    assert stats[1]["tiers"]["gpu"]["evictions"] > 0
    if with_disk:
        assert stats[1]["tiers"]["disk"]["hits"] > 0


def assert_device_table_matches_the_placement(placement):
    """Every span's entry in the device table is its GPU slot, or -1 - its host slot."""
    uids = np.arange(placement.uids)
    tier = placement.tier.data[: placement.uids]
    where = placement.table.where.data[: placement.uids].cpu().numpy()
    on_gpu, on_host = uids[tier == GPU], uids[tier == HOST]
    assert len(on_gpu) + len(on_host) == placement.uids
    assert np.array_equal(where[on_gpu], placement.gpu.slots_of(on_gpu))
    assert np.array_equal(where[on_host], -1 - placement.host.slots_of(on_host))


def test_a_budgeted_gpu_pool_grows_by_doubling_then_to_its_budget_in_one_step():
    from kvtier.buffers import growth_target
    from kvtier.tiers.gpu import DevicePool

    assert [growth_target(have, have + 1, None) for have in (16, 32)] == [32, 64]
    assert growth_target(16, 17, 1024) == 32 and growth_target(64, 65, 1024) == 128
    assert growth_target(128, 129, 1024) == 1024  # 256 would pass 1/8 of the budget: all of it at once
    pool = DevicePool(SPAN_SHAPE, torch.float32, torch.device("cpu"), capacity=200)
    sizes = []
    for start in range(0, 200, 10):
        pool.put(np.arange(start, start + 10), torch.zeros(10, *SPAN_SHAPE))
        sizes.append(pool.data.shape[0])
    assert sorted(set(sizes)) == [16, 200]  # never above the budget; the growth copy held 16 + 200 slots


def test_a_gpu_pool_short_of_memory_grows_in_smaller_steps_then_names_gpu_budget(monkeypatch):
    """The device cannot hold the old and the doubled pool at once: the pool grows by less; when even the spans
    needed do not fit, TierFullError names gpu_budget, and the pool and its slot map are left as they were."""
    from kvtier.errors import CorruptCacheError, TierFullError
    from kvtier import buffers
    from kvtier.buffers import fallback_targets
    from kvtier.tiers.gpu import DevicePool

    assert fallback_targets(64, 65, None) == [128, 96, 80, 65]
    assert fallback_targets(64, 80, 90) == [90, 80]  # a budget caps every step
    real_buffer = buffers.buffer

    def device_of_40_slots(shape, *args, **kwargs):  # what is allocated now (16 slots) + the new allocation
        if shape[0] + 16 > 40:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real_buffer(shape, *args, **kwargs)

    pool = DevicePool(SPAN_SHAPE, torch.float32, torch.device("cpu"), capacity=None)
    monkeypatch.setattr(buffers, "buffer", device_of_40_slots)
    pool.put(np.arange(17), torch.zeros(17, *SPAN_SHAPE))
    assert pool.data.shape[0] == 24  # 32 did not fit beside the 16; 16 + 16 // 2 did
    with pytest.raises(TierFullError, match="set gpu_budget"):
        pool.put(np.arange(17, 47), torch.zeros(30, *SPAN_SHAPE))
    assert pool.data.shape[0] == 24 and len(pool) == 17 and not pool.contains(17)


def test_pools_move_spans_down_in_large_rare_batches():
    assert shortfall(count=16, capacity=1600, available=1000) == 0  # 1/16 of the pool stays free: nothing moves
    assert shortfall(count=16, capacity=1600, available=110) == 16 + 200 - 110  # below it: free 2/16 at once
    assert shortfall(count=5, capacity=8, available=4) == 5 + 2 - 4  # tiny pools keep at least one slot spare
    assert shortfall(count=16, capacity=1600, available=60, most=50) == 16 + 100 - 60  # headroom capped at 50
    assert shortfall(count=16, capacity=1600, available=70, most=50) == 0


@pytest.mark.parametrize("store_kind", ["gpu", "host", "lmdb", "disk tier"])
def test_every_store_keeps_the_span_store_protocol(tmp_path, store_kind):
    """put / get_into / contains / holds / evict / nbytes behave the same for the stores the placement composes."""
    from kvtier.tiers.gpu import DevicePool

    stores = {
        "gpu": lambda: DevicePool(SPAN_SHAPE, torch.float32, torch.device("cpu"), capacity=8),
        "host": lambda: HostPool(SPAN_SHAPE, torch.float32, capacity=8, pinned=False),
        "lmdb": lambda: LmdbStore.spill(tmp_path, SPAN_SHAPE, torch.float32, budget=None),
        "disk tier": lambda: DiskTier(LmdbStore.spill(tmp_path, SPAN_SHAPE, torch.float32, budget=None)),
    }
    store = stores[store_kind]()
    assert isinstance(store, SpanStore)
    spans = torch.randn(5, *SPAN_SHAPE)
    store.put(np.arange(10, 15), spans.clone())
    on_disk = store_kind in ("lmdb", "disk tier")
    if on_disk:
        store.wait_any()  # a span is held once its write committed
    assert all(store.contains(uid) for uid in range(10, 15)) and not store.contains(3)
    out = torch.full((2, *SPAN_SHAPE), float("nan"))
    store.get_into(np.array([14, 11]), out)
    assert torch.equal(out, spans[[4, 1]])
    assert store.nbytes >= 5 * SPAN_BYTES
    store.evict(np.array([11]))
    assert not store.contains(11) and store.contains(12)
    assert store.holds(np.array([12, 11, 3, 10_000])).tolist() == [True, False, False, False]
    if on_disk:
        store.close()


def test_an_unbounded_host_pool_keeps_promoted_spans_so_moving_them_down_again_copies_nothing():
    config = ReAttentionConfig(gpu_budget=8 * SPAN_BYTES)
    placement = Placement(config.resolve(2048), SPAN_SHAPE, torch.float32, torch.device("cpu"), step_spans=4)
    spans = torch.randn(64, *SPAN_SHAPE)  # [N, 2, Hkv, S, D]
    for start in range(0, 24, 4):
        placement.add(spans[start : start + 4])
    placement.poll()
    uid = int(np.flatnonzero(placement.tier.data[:24] == HOST)[0])
    host_slot = int(placement.host.slots_of(np.array([uid]))[0])
    for _ in range(2):  # selected twice on the host: promoted to the GPU, its host copy kept
        assert torch.equal(placement.fetch(np.array([uid]))[0], spans[uid])
    assert placement.tier.data[uid] == GPU and placement.host.holds(np.array([uid]))[0]
    evictions, copied = placement.ledger.counters["gpu"].evictions, placement.ledger.moved["gpu->host"]
    for start in range(24, 64, 4):  # newer spans push it down again
        placement.add(spans[start : start + 4])
        placement.poll()
    assert placement.tier.data[uid] == HOST and placement.host.slots_of(np.array([uid]))[0] == host_slot
    moved_down = placement.ledger.counters["gpu"].evictions - evictions
    assert placement.ledger.moved["gpu->host"] - copied == (moved_down - 1) * SPAN_BYTES  # all but the kept one copied
    assert torch.equal(placement.read_spans(np.arange(64)), spans)
    placement.close()


def test_scratch_rows_are_kept_while_big_enough_then_grow_by_doubling():
    first = scratch_rows(None, 3, SPAN_SHAPE, torch.float32)
    assert first.shape == (3, *SPAN_SHAPE)
    assert scratch_rows(first, 2, SPAN_SHAPE, torch.float32) is first
    grown = scratch_rows(first, 4, SPAN_SHAPE, torch.float32)
    assert grown.shape[0] == 6 and scratch_rows(grown, 20, SPAN_SHAPE, torch.float32).shape[0] == 20


def test_a_growable_tensor_short_of_memory_grows_in_smaller_steps_then_names_the_fix(monkeypatch):
    """consensus' span table (a GrowableTensor of every middle key) doubling past the device: it grows by less, as the
    GPU pool does; when even the entries needed do not fit, the error names the budget and the table is unchanged."""
    from kvtier import buffers
    from kvtier.buffers import GrowableTensor

    table = GrowableTensor((1, 0, 2), 1, torch.float32, torch.device("cpu"), capacity=64)
    table.append(torch.ones(1, 64, 2))
    real_buffer = buffers.buffer

    def device_of_160_entries(shape, *args, **kwargs):  # the 64 held + the new allocation
        if shape[1] + 64 > 160:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real_buffer(shape, *args, **kwargs)

    monkeypatch.setattr(buffers, "buffer", device_of_160_entries)
    table.append(torch.full((1, 1, 2), 2.0))
    assert table.data.shape[1] == 96 and table.length == 65  # 128 did not fit beside the 64; 64 + 64 // 2 did
    assert table.view()[0, :, 0].tolist() == [1.0] * 64 + [2.0]
    with pytest.raises(torch.OutOfMemoryError, match="lower gpu_budget"):
        table.append(torch.zeros(1, 40, 2))
    assert table.data.shape[1] == 96 and table.length == 65
