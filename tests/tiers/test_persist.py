"""cache.save / ReAttentionCache.load: a saved context continues in a new process exactly as the uninterrupted run
does; the file holds checksummed kvtier records only; every bad input raises its documented error and leaves what is
on disk byte-for-byte unchanged."""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from kvtier import ReAttentionCache, records
from kvtier.errors import CacheFileNotFoundError, CacheWriteError, CorruptCacheError, IncompatibleCacheError, TierFullError
from kvtier.persist import LEGACY_VERSION, VERSION
from kvtier.tiers.disk import put_records, span_key
from tests.conftest import greedy, random_ids, tiny_model
from tests.tiers.persist_worker import read_records

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)
SPAN_BYTES = 2 * 2 * 4 * 16 * 4  # K and V, 2 KV heads, 4 tokens, head_dim 16, float32
NEW_TOKENS = 12


def _spilling(batch: int, disk_path: Path) -> dict:
    """Budgets barely above what one step needs (batch * (top_k + chunk/span + seal_group - 1) spans): most spans go
    to LMDB."""
    step = batch * (3 + 3 + 3)
    return dict(gpu_budget=step * SPAN_BYTES, host_budget=(step + 2) * SPAN_BYTES, disk_path=str(disk_path))


@dataclass
class Saved:
    path: Path
    ids: torch.Tensor  # [B, T]; the cache was saved holding ids[:, :-1]
    token_ids: torch.Tensor  # cache.token_ids when saved
    tokens: int  # stats()["tokens"] when saved
    tiers: dict[str, int]  # stats()["spans"] when saved
    reference: list  # what the same cache object generated after the save, in this process


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def load(model):
    """ReAttentionCache.load, closing every loaded cache (and its LMDB file) when the test ends."""
    opened = []

    def _load(path: Path, into=None, **placement) -> ReAttentionCache:
        opened.append(ReAttentionCache.load(path, into if into is not None else model, **placement))
        return opened[-1]

    yield _load
    for cache in opened:
        cache.close()


@pytest.fixture(scope="module")
def saves(model, tmp_path_factory) -> dict[str, Saved]:
    """Three saved caches, each followed by its uninterrupted continuation in this process."""
    root = tmp_path_factory.mktemp("saves")
    spill = tmp_path_factory.mktemp("spill")
    cases = {
        "batch1": (random_ids(150, batch=1, seed=11), {}),
        "batch2": (random_ids(150, batch=2, seed=12), {}),
        "spilled": (random_ids(200, batch=2, seed=13), _spilling(2, spill)),
    }
    out = {}
    for name, (ids, placement) in cases.items():
        cache = ReAttentionCache(model, **TINY, **placement)
        with torch.inference_mode():
            model(ids[:, :-1], past_key_values=cache, use_cache=True)
        path = root / f"{name}.lmdb"
        cache.save(path)
        stats, token_ids = cache.stats(), cache.token_ids
        reference = greedy(model, ids, cache, new_tokens=NEW_TOKENS).tolist()
        out[name] = Saved(path, ids, token_ids, stats["tokens"], stats["spans"], reference)
        cache.close()
    return out


def _run_worker(jobs: list[dict], tmp: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run tests/tiers/persist_worker.py on `jobs` in a fresh interpreter -> (the process, its results by job name)."""
    jobs_path, results_path = tmp / "jobs.json", tmp / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "tiers" / "persist_worker.py"), str(jobs_path), str(results_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    return proc, results


def _job(name: str, action: str, saved: Saved, path: Path | None = None, **extra) -> dict:
    return dict(name=name, action=action, path=str(path or saved.path), ids=saved.ids.tolist(), new_tokens=NEW_TOKENS, **extra)


# job -> (the save it loads, whether the load sets tiny budgets and a disk_path: the save was made without them)
CONTINUATIONS = {
    "batch1": ("batch1", False),
    "batch2": ("batch2", False),
    "spilled before saving": ("spilled", False),
    "loaded with other budgets": ("batch2", True),
}


@pytest.fixture(scope="module")
def new_process(saves, tmp_path_factory) -> dict:
    """One fresh process runs every continuation job (and the resave job on a copy of the spilled save)."""
    tmp = tmp_path_factory.mktemp("new_process")
    jobs = []
    for name, (case, spill_on_load) in CONTINUATIONS.items():
        placement = _spilling(saves[case].ids.shape[0], tmp / "spill") if spill_on_load else {}
        jobs.append(_job(name, "continue", saves[case], placement=placement))
    resaved = tmp / "resaved.lmdb"
    shutil.copyfile(saves["spilled"].path, resaved)
    jobs.append(_job("resave", "resave", saves["spilled"], path=resaved))
    proc, results = _run_worker(jobs, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(results, resaved_path=resaved, tmp=tmp)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(directory: Path) -> dict[str, str]:
    """Every entry under `directory` -> the sha256 of its bytes ("dir" for folders)."""
    return {
        str(entry.relative_to(directory)): "dir" if entry.is_dir() else _sha256(entry)
        for entry in sorted(directory.rglob("*"))
    }


@contextmanager
def unchanged(directory: Path):
    """Asserts that nothing under `directory` was created, removed or altered by the block."""
    before = _snapshot(directory)
    yield
    assert _snapshot(directory) == before


# ---- a new process continues exactly --------------------------------------------------------------------------------
@pytest.mark.parametrize("job", list(CONTINUATIONS))
def test_a_new_process_continues_with_the_tokens_of_the_uninterrupted_run(saves, new_process, job):
    saved = saves[CONTINUATIONS[job][0]]
    result = new_process[job]
    assert "error" not in result, result
    assert result["loaded_tokens"] == saved.tokens
    assert result["token_ids_are_the_prefix"]
    assert result["tokens"] == saved.reference


def test_the_spilled_save_really_had_spans_in_lmdb_and_the_rebudgeted_load_read_them_lazily(saves, new_process):
    assert saves["spilled"].tiers["disk"] > 0
    assert new_process["loaded with other budgets"]["moved"]["disk->host"] > 0


def test_save_load_save_to_the_same_path_then_load_continues_identically(saves, new_process):
    result = new_process["resave"]
    assert "error" not in result, result
    assert result["tokens"] == saves["spilled"].reference
    # the first loaded cache still reads the file it loaded, though its path now names the new one
    assert result["first_load_tokens"] == saves["spilled"].reference
    assert read_records(new_process["resaved_path"]) == read_records(saves["spilled"].path)
    assert sorted(p.name for p in new_process["resaved_path"].parent.glob("resaved*")) == ["resaved.lmdb"]


# ---- what a saved file holds ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["batch1", "batch2", "spilled"])
def test_a_loaded_cache_holds_the_saved_tokens_with_every_span_on_disk(saves, load, case):
    saved = saves[case]
    cache = load(saved.path)
    assert cache.stats()["tokens"] == saved.tokens == saved.ids.shape[1] - 1
    assert torch.equal(cache.token_ids, saved.token_ids)
    assert torch.equal(saved.token_ids, saved.ids[:, :-1])
    assert cache.stats()["spans"] == {"gpu": 0, "host": 0, "disk": sum(saved.tiers.values())}


def test_saving_leaves_only_the_saved_files_no_partial_or_lock(saves):
    folder = saves["batch1"].path.parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(s.path.name for s in saves.values())


@pytest.mark.parametrize("case", ["batch1", "spilled"])
def test_every_record_is_a_checksummed_kvtier_record_with_the_expected_keys(saves, case):
    saved = saves[case]
    found = read_records(saved.path)
    assert all(value.startswith(records.MAGIC) for value in found.values())
    meta = records.decode_json(found[b"meta"], "meta")
    spans = sum(saved.tiers.values())
    assert (meta["version"], meta["tokens"], meta["spans"]) == (VERSION, saved.tokens, spans)
    span_records = {span_key(uid) for uid in range(spans)}  # one record per span
    layers = {f"layer/{i}/{name}".encode() for i in range(2)
              for name in ("global_keys", "global_values", "local_keys", "local_values", "summaries", "span_ids")}
    # the default policy (consensus) keeps its observation window, last selection and reuse count per layer
    policy = {f"layer/{i}/policy.{name}".encode() for i in range(2) for name in ("window", "selected", "spans", "steps")}
    assert [layer["policy_state"] for layer in meta["layers"]] == [["selected", "spans", "steps", "window"]] * 2
    assert set(found) == {b"meta", b"tokens"} | layers | policy | span_records
    for key, value in found.items():  # every checksum verified
        records.decode(value, key.decode(errors="replace"))
        if key in span_records:
            assert list(records.decode_tensor(value, "span").shape) == meta["span_shape"]
    assert torch.equal(records.decode_tensor(found[b"tokens"], "tokens"), saved.token_ids)


# ---- bad inputs to load ---------------------------------------------------------------------------------------------
@pytest.fixture
def copy_of_save(saves, tmp_path) -> Path:
    """A private copy of the batch-1 save, free to damage."""
    path = tmp_path / "copy.lmdb"
    shutil.copyfile(saves["batch1"].path, path)
    return path


def _flip_byte_in_record(path: Path, key: bytes, offset: int = -1) -> None:
    """Invert byte `offset` of record `key` wherever the record's bytes lie in the file (a small record stored in a
    leaf page may also sit in a page LMDB freed when it copied that leaf)."""
    value = read_records(path)[key]
    data = bytearray(path.read_bytes())
    start = data.find(value)
    assert start >= 0, "the record's bytes must be in the file"
    while start >= 0:
        data[start + offset % len(value)] ^= 0xFF
        start = data.find(value, start + 1)
    path.write_bytes(bytes(data))


def _where_span_is(path: Path, uid: int) -> tuple[bytes, int]:
    """Saved span `uid` -> (the key of its record, the offset of its middle byte in that record)."""
    record = read_records(path)[span_key(uid)]
    _, payload = records.unpack(record, f"span {uid}")
    return span_key(uid), len(record) - len(payload) + len(payload) // 2


def _rewrite_records(path: Path, put: dict[bytes, bytes] | None = None, delete: tuple[bytes, ...] = ()) -> None:
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        for key, value in (put or {}).items():
            txn.put(key, value)
        for key in delete:
            assert txn.delete(key)
    env.close()


def test_loading_a_missing_path_raises_cache_file_not_found(load, tmp_path):
    with unchanged(tmp_path), pytest.raises(CacheFileNotFoundError, match="no saved kvtier cache"):
        load(tmp_path / "absent.lmdb")


def test_loading_a_directory_raises_corrupt_cache(load, tmp_path):
    folder = tmp_path / "folder.lmdb"
    folder.mkdir()
    (folder / "data.mdb").write_bytes(b"x" * 100)
    with unchanged(tmp_path), pytest.raises(CorruptCacheError, match="directory"):
        load(folder)


def test_loading_garbage_raises_corrupt_cache(load, tmp_path):
    path = tmp_path / "garbage.lmdb"
    path.write_bytes(np.random.default_rng(0).bytes(20_000))
    with unchanged(tmp_path), pytest.raises(CorruptCacheError, match="not a kvtier cache"):
        load(path)


def test_loading_a_truncated_save_raises_corrupt_cache_not_a_crash(saves, tmp_path):
    """Run in a fresh process: a careless reader dies of SIGBUS here, which would take pytest down with it."""
    folder = tmp_path / "files"
    folder.mkdir()
    path = folder / "truncated.lmdb"
    data = saves["spilled"].path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with unchanged(folder):
        proc, results = _run_worker([dict(name="truncated", action="load", path=str(path))], tmp_path)
    assert proc.returncode == 0, f"loading a truncated save killed the process (exit status {proc.returncode})"
    assert results["truncated"].get("error") == "CorruptCacheError", results


def test_a_damaged_span_record_raises_corrupt_cache_when_that_span_is_read(load, copy_of_save):
    spans = records.decode_json(read_records(copy_of_save)[b"meta"], "meta")["spans"]
    damaged = spans // 2
    _flip_byte_in_record(copy_of_save, *_where_span_is(copy_of_save, damaged))
    with unchanged(copy_of_save.parent):
        try:
            cache = load(copy_of_save)
        except CorruptCacheError:
            return  # refusing the whole file up front is allowed too
        intact = np.array([uid for uid in range(spans) if uid != damaged])
        assert cache.placement.read_spans(intact).shape[0] == spans - 1
        with pytest.raises(CorruptCacheError, match=f"span {damaged}.*checksum"):
            cache.placement.read_spans(np.array([damaged]))


def test_damaged_spans_raise_corrupt_cache_during_generation(saves, load, model, copy_of_save):
    spans = records.decode_json(read_records(copy_of_save)[b"meta"], "meta")["spans"]
    for uid in range(spans):  # whichever spans generation selects, each is damaged
        _flip_byte_in_record(copy_of_save, *_where_span_is(copy_of_save, uid))
    cache = load(copy_of_save)
    with unchanged(copy_of_save.parent), pytest.raises(CorruptCacheError, match="checksum mismatch"):
        greedy(model, saves["batch1"].ids, cache, new_tokens=NEW_TOKENS)


def test_a_format_2_file_without_span_ids_still_loads_and_continues(model, load, copy_of_save, saves):
    """Format 2 (before span ids) saved each row's spans in table order; a file of it loads as it did."""
    meta = records.decode_json(read_records(copy_of_save)[b"meta"], "meta")
    span_ids = tuple(f"layer/{index}/span_ids".encode() for index in range(len(meta["layers"])))
    assert all(torch.equal(records.decode_tensor(read_records(copy_of_save)[key], "ids").flatten(),
                           torch.arange(offset, offset + layer["spans"]))
               for key, offset, layer in zip(span_ids, np.cumsum([0] + [l["spans"] for l in meta["layers"]]),
                                             meta["layers"]))  # no shared spans: the ids format 2 implied
    _rewrite_records(copy_of_save, put={b"meta": records.encode_json(dict(meta, version=LEGACY_VERSION))},
                     delete=span_ids)
    saved = saves["batch1"]
    assert greedy(model, saved.ids, load(copy_of_save), new_tokens=NEW_TOKENS).tolist() == saved.reference


def test_span_ids_naming_no_saved_span_raise_corrupt_cache(load, copy_of_save):
    meta = records.decode_json(read_records(copy_of_save)[b"meta"], "meta")
    ids = torch.full((1, meta["layers"][0]["spans"]), meta["spans"], dtype=torch.int64)
    _rewrite_records(copy_of_save, put={b"layer/0/span_ids": records.encode_tensor(ids)})
    with unchanged(copy_of_save.parent), pytest.raises(CorruptCacheError, match="span ids do not name"):
        load(copy_of_save)


def test_a_damaged_meta_record_raises_corrupt_cache(load, copy_of_save):
    _flip_byte_in_record(copy_of_save, b"meta")
    with unchanged(copy_of_save.parent), pytest.raises(CorruptCacheError, match="meta.*checksum"):
        load(copy_of_save)


def test_a_missing_spans_record_raises_corrupt_cache(load, copy_of_save):
    _rewrite_records(copy_of_save, delete=(span_key(0),))
    with unchanged(copy_of_save.parent), pytest.raises(CorruptCacheError, match="records, its metadata says"):
        load(copy_of_save)


def test_a_newer_format_version_raises_incompatible_cache(load, copy_of_save):
    meta = records.decode_json(read_records(copy_of_save)[b"meta"], "meta")
    _rewrite_records(copy_of_save, put={b"meta": records.encode_json(dict(meta, version=VERSION + 1))})
    with unchanged(copy_of_save.parent), pytest.raises(IncompatibleCacheError, match=f"format {VERSION + 1}"):
        load(copy_of_save)


def test_a_format_1_file_raises_incompatible_cache_asking_for_a_new_prefill(load, copy_of_save):
    """Format 1 let a record hold several spans and named the fingerprint's hash weights_sha256: its files are
    refused, not misread."""
    meta = records.decode_json(read_records(copy_of_save)[b"meta"], "meta")
    fingerprint = dict(meta["fingerprint"])
    fingerprint["weights_sha256"] = fingerprint.pop("parameter_shapes_sha256")
    old = dict(meta, version=1, spans_per_record=1, fingerprint=fingerprint)
    _rewrite_records(copy_of_save, put={b"meta": records.encode_json(old)})
    with unchanged(copy_of_save.parent), pytest.raises(
        IncompatibleCacheError, match=f"format 1 .*reads formats {LEGACY_VERSION} and {VERSION}: re-run the prefill and save again"
    ):
        load(copy_of_save)


@pytest.mark.parametrize(
    "overrides, field",
    [(dict(num_hidden_layers=3), "layers: saved 2, model 3"), (dict(hidden_size=192), "hidden_size: saved 96, model 192")],
    ids=["layers", "hidden_size"],
)
def test_loading_into_a_model_of_another_shape_raises_incompatible_naming_the_field(saves, load, overrides, field):
    other = tiny_model("llama", **overrides)
    with unchanged(saves["batch1"].path.parent), pytest.raises(IncompatibleCacheError, match=field):
        load(saves["batch1"].path, into=other)


def test_loading_into_the_model_in_bfloat16_raises_incompatible_naming_the_dtype(saves, load):
    other = tiny_model("llama").to(torch.bfloat16)
    with unchanged(saves["batch1"].path.parent), pytest.raises(IncompatibleCacheError, match="dtype: saved 'float32', model 'bfloat16'"):
        load(saves["batch1"].path, into=other)


def test_load_sets_only_placement_fields(saves, load):
    with unchanged(saves["batch1"].path.parent), pytest.raises(ValueError, match=r"load\(\) can only set.*top_k"):
        load(saves["batch1"].path, top_k=5)


def test_one_save_loads_twice_in_one_process_and_both_continue(saves, load, model):
    saved = saves["batch2"]
    first, second = load(saved.path), load(saved.path)
    assert greedy(model, saved.ids, second, new_tokens=NEW_TOKENS).tolist() == saved.reference
    assert greedy(model, saved.ids, first, new_tokens=NEW_TOKENS).tolist() == saved.reference


def test_a_closed_and_dropped_load_leaves_another_load_of_the_same_file_readable(saves, load, model):
    saved = saves["batch2"]
    first, second = ReAttentionCache.load(saved.path, model), load(saved.path)
    first.close()
    del first
    gc.collect()  # the placement's finalizer closes its file store once more: it must not release the shared handle
    assert greedy(model, saved.ids, second, new_tokens=NEW_TOKENS).tolist() == saved.reference


# ---- bad targets for save -------------------------------------------------------------------------------------------
@pytest.fixture
def small_cache(model):
    cache = ReAttentionCache(model, **TINY)
    with torch.inference_mode():
        model(random_ids(80, seed=21), past_key_values=cache, use_cache=True)
    return cache


def _parent_missing(tmp: Path) -> Path:
    return tmp / "no" / "such" / "ctx.lmdb"


def _parent_is_a_file(tmp: Path) -> Path:
    (tmp / "file").write_bytes(b"not a folder")
    return tmp / "file" / "ctx.lmdb"


def _path_is_a_directory(tmp: Path) -> Path:
    (tmp / "ctx.lmdb").mkdir()
    (tmp / "ctx.lmdb" / "inside").write_bytes(b"keep me")
    return tmp / "ctx.lmdb"


@pytest.mark.parametrize("target", [_parent_missing, _parent_is_a_file, _path_is_a_directory])
def test_saving_where_no_file_can_be_written_raises_cache_write_error(small_cache, tmp_path, target):
    path = target(tmp_path)
    with unchanged(tmp_path), pytest.raises(CacheWriteError, match="cannot save"):
        small_cache.save(path)


def test_a_folder_where_the_partial_file_goes_raises_cache_write_error_and_keeps_the_previous_save(saves, small_cache, tmp_path):
    path = tmp_path / "ctx.lmdb"
    shutil.copyfile(saves["batch1"].path, path)
    (tmp_path / "ctx.lmdb.partial").mkdir()
    (tmp_path / "ctx.lmdb.partial" / "inside").write_bytes(b"keep me")
    with unchanged(tmp_path), pytest.raises(CacheWriteError, match="unchanged"):
        small_cache.save(path)


def test_a_full_disk_during_save_raises_cache_write_error_and_keeps_the_previous_save(saves, tmp_path):
    """The save runs in a process whose file writes past 64 KiB fail with EFBIG (a disk that fills up)."""
    folder = tmp_path / "target"
    folder.mkdir()
    path = folder / "ctx.lmdb"
    shutil.copyfile(saves["batch1"].path, path)
    longer = random_ids(400, seed=31)
    longer[:, : saves["batch1"].tokens] = saves["batch1"].token_ids
    job = dict(name="full", action="save_on_full_disk", path=str(path), ids=longer.tolist(), limit=64 * 2**10)
    with unchanged(folder):
        proc, results = _run_worker([job], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results["full"].get("error") == "CacheWriteError", results
    assert "unchanged" in results["full"]["message"]


# ---- LMDB map and tier budgets --------------------------------------------------------------------------------------
def test_put_records_grows_a_map_too_small_for_the_records(tmp_path):
    env = lmdb.open(str(tmp_path / "small.lmdb"), subdir=False, map_size=64 * 2**10, lock=False)
    start = env.info()["map_size"]
    items = [(span_key(i), bytes([i % 256]) * 5000) for i in range(200)]  # ~1 MB, 16x the map
    put_records(env, items, threading.Lock())
    assert env.info()["map_size"] > start
    with env.begin() as txn:
        assert [(key, txn.get(key)) for key, _ in items] == items
    env.close()


def test_a_disk_budget_too_small_for_the_spill_raises_tier_full_during_generation(model, tmp_path):
    cache = ReAttentionCache(model, **TINY, **_spilling(1, tmp_path / "spill"), disk_budget=4 * SPAN_BYTES)
    with pytest.raises(TierFullError, match="disk_budget"):
        greedy(model, random_ids(200, seed=41), cache, new_tokens=4)


def test_a_disk_path_that_is_a_file_raises_cache_write_error_at_the_first_forward(model, tmp_path):
    path = tmp_path / "spill-here"
    path.write_bytes(b"a file, not a folder")
    cache = ReAttentionCache(model, **TINY, **_spilling(1, path))
    with unchanged(tmp_path), pytest.raises(CacheWriteError, match="disk_path"):
        greedy(model, random_ids(60, seed=42), cache, new_tokens=2)


@pytest.mark.parametrize("budget", ["gpu_budget", "host_budget"])
def test_a_budget_smaller_than_one_span_raises_tier_full_naming_it(model, tmp_path, budget):
    placement = dict(_spilling(1, tmp_path / "spill"), **{budget: SPAN_BYTES // 2})
    cache = ReAttentionCache(model, **TINY, **placement)
    with pytest.raises(TierFullError, match=f"{budget}={SPAN_BYTES // 2} bytes holds 0 spans"):
        greedy(model, random_ids(60, seed=43), cache, new_tokens=2)
