"""Saving a cache to one LMDB file and loading it back for the same model.

The file holds: a JSON `meta` record (format version, config, the model's fingerprint, token count, per-layer sizes),
the token ids, each layer's global tokens, local window, span summaries and span ids, and every span once (rows that
share spans, as beams and samples of one prompt do, name the same saved span). All records are raw
tensor bytes or JSON with checksums (kvtier.records); nothing is pickled. A save writes `<path>.partial`, syncs
it and renames it over `path`, so an interrupted save leaves the previous file or none, never a partial one.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from tqdm.auto import tqdm

from kvtier import records
from kvtier.config import PLACEMENT_FIELDS, ReAttentionConfig
from kvtier.errors import CacheFileNotFoundError, CacheWriteError, CorruptCacheError, IncompatibleCacheError
from kvtier.tiers.disk import WRITE_BATCH_BYTES, LmdbStore, encode_each, open_saved, put_records, release_saved
from kvtier.version import __version__

FORMAT = "kvtier-cache"
VERSION = 3  # records layer/i/... with span ids, or for a left-padded batch row/r/layer/i/... (kvtier.rows)
LEGACY_VERSION = 2  # read too: no span ids (each row's spans saved in order), no padded rows
_PAGE = 4096
_META_KEYS = {"config", "fingerprint", "dtype", "batch", "tokens", "token_ids", "span_shape", "spans", "layers"}
_LAYER_TENSORS = ("global_keys", "global_values", "local_keys", "local_values", "summaries")
_SPAN_IDS = "span_ids"  # [rows, spans] the saved span each of the layer's table entries names (format 3)
_POLICY = "policy."  # the policy's per-layer state (Policy.layer_state), named in the layer's meta entry


def fingerprint(model) -> dict[str, Any]:
    """What a saved cache's model must match: family, shapes, and a hash of the parameters' names and shapes (not
    of their values: the same model with other weights loads, and continues with its own)."""
    config = model.config
    heads = config.num_attention_heads
    shapes = "\n".join(f"{name}:{tuple(param.shape)}" for name, param in model.named_parameters())
    return {
        "family": config.model_type,
        "layers": config.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "window": config.max_position_embeddings,
        "parameter_shapes_sha256": hashlib.sha256(shapes.encode()).hexdigest(),
    }


def _layer_key(prefix: str, index: int, name: str) -> bytes:
    return f"{prefix}layer/{index}/{name}".encode()


def _prefixes(count: int, padded: bool) -> list[str]:
    """The record-key prefix of each of a cache's streams (ReAttentionCache.streams)."""
    return [f"row/{row}/" for row in range(count)] if padded else [""]


def _record_pages(length: int) -> int:
    return -(-(length + 64) // _PAGE) + 1


# ---- save ---------------------------------------------------------------------------------------------------------
def save_cache(cache, path: Path) -> None:
    if cache.placement is None:
        raise ValueError("this cache holds no tokens yet: run a forward (or generate) with it before saving")
    if len(cache.placements) > 1:
        raise ValueError(
            "this cache's layers are on several devices (device_map) and each device numbers its spans on its own: "
            "saving such a cache is not supported yet. Save from the model on one device; a saved file loads into "
            "a model spread over several (each layer's state goes to its layer's device)")
    if path.is_dir():
        raise CacheWriteError(f"cannot save to {str(path)!r}: it is a directory; give a file path such as ctx.lmdb")
    if not path.parent.is_dir():
        raise CacheWriteError(f"cannot save to {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    partial = path.with_name(path.name + ".partial")
    if partial.is_dir():
        raise CacheWriteError(
            f"cannot save to {str(path)!r}: {str(partial)!r} (where a save is written first) is a directory; "
            "remove it. The file at that path is unchanged"
        )
    try:
        _write(cache, partial)
        os.replace(partial, path)
        _fsync_directory(path.parent)
    except BaseException as err:
        for leftover in (partial, Path(str(partial) + "-lock")):
            leftover.unlink(missing_ok=True)
        if isinstance(err, (OSError, lmdb.Error)) and not isinstance(err, CacheWriteError):
            raise CacheWriteError(
                f"saving the cache to {str(path)!r} failed ({err}); whatever was at that path is unchanged. "
                "Free disk space or choose a writable location"
            ) from None
        raise


def _write(cache, partial: Path) -> None:
    placement = cache.placement
    streams = cache.streams()
    layers = [layer for stream, _ in streams for layer in stream if layer.is_initialized]
    if len(layers) != sum(len(stream) for stream, _ in streams):
        raise ValueError("some layers of this cache never saw a token; save after a complete forward")
    uids = np.concatenate([layer.table.uids_host.view().flatten().numpy() for layer in layers])
    distinct, first_seen, saved_ids = np.unique(uids, return_index=True, return_inverse=True)
    order = np.argsort(first_seen, kind="stable")  # saved span i = the i-th distinct uid met, in table order
    saved_ids = np.argsort(order)[saved_ids]  # [entries] the saved span each table entry names
    span_count = len(distinct)
    estimate = (_record_pages(placement.span_bytes + 256) * span_count + 64) * _PAGE  # a span and its header per record
    layer_records = [*_layer_tensors(layers[0]).values(), layers[0].table.uids_host.view(),
                     *streams[0][1].layer_state(0).values()]
    estimate += sum(_record_pages(t.numel() * t.element_size()) * _PAGE for t in layer_records) * len(layers)
    partial.unlink(missing_ok=True)
    env = lmdb.open(str(partial), subdir=False, map_size=int(estimate * 1.25) + 2**24, lock=False, sync=False,
                    metasync=False, readahead=False)
    unlocked = _NoLock()
    try:
        items: list[tuple[bytes, bytes]] = []
        entry = 0
        for prefix, (stream, policy) in zip(_prefixes(len(streams), cache.padded), streams):
            for index, layer in enumerate(stream):
                table = layer.table.uids_host.view()  # [rows, spans]
                ids = torch.from_numpy(saved_ids[entry : entry + table.numel()]).view(table.shape)
                entry += table.numel()
                items += [(_layer_key(prefix, index, name), records.encode_tensor(t.cpu()))
                          for name, t in (_layer_tensors(layer) | {_SPAN_IDS: ids}).items()]
                items += [(_layer_key(prefix, index, _POLICY + name), records.encode_tensor(t.cpu()))
                          for name, t in policy.layer_state(index).items()]
        tokens = cache.token_ids
        if tokens is not None:
            items.append((b"tokens", records.encode_tensor(tokens)))
        put_records(env, items, unlocked)
        _write_spans(placement, distinct[order], env, unlocked)
        put_records(env, [(b"meta", records.encode_json(_meta(cache, span_count, tokens is not None)))], unlocked)
        env.sync(True)
    finally:
        env.close()


def _layer_tensors(layer) -> dict[str, torch.Tensor]:
    global_keys, global_values = layer.global_region.view()
    local_keys, local_values = layer.local.view()
    return dict(zip(_LAYER_TENSORS, (global_keys, global_values, local_keys, local_values, layer.table.summaries.view())))


def _write_spans(placement, uids: np.ndarray, env, lock) -> None:
    """The spans `uids` [U] (distinct) as saved spans 0, 1, 2, ... - the uids a load gives them back - one record each,
    a batch of records per transaction."""
    per_batch = max(1, WRITE_BATCH_BYTES // placement.span_bytes)
    span_count = len(uids)
    with tqdm(total=span_count, unit="span", desc="saving spans", disable=span_count < 50_000) as progress:
        for start in range(0, span_count, per_batch):
            spans = placement.read_spans(uids[start : start + per_batch])  # [N, 2, Hkv, S, D] on the host
            put_records(env, encode_each(np.arange(start, start + spans.shape[0]), spans), lock)
            progress.update(spans.shape[0])


def _meta(cache, span_count: int, has_tokens: bool) -> dict[str, Any]:
    config = cache.config.replace(**dict.fromkeys(PLACEMENT_FIELDS))  # tiers are per session, not part of the context
    streams = [
        [{"seen": layer.seen, "largest_scope": layer.largest_scope, "spans": len(layer.table),
          "policy_state": sorted(policy.layer_state(index))} for index, layer in enumerate(stream)]
        for stream, policy in cache.streams()
    ]
    first = cache.streams()[0][0][0]
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "kvtier": __version__,
        "config": config.to_dict(),
        "fingerprint": cache.model_fingerprint,
        "dtype": str(first.dtype).removeprefix("torch."),
        "batch": len(streams) if cache.padded else first.batch,
        "tokens": cache.get_seq_length(),
        "token_ids": has_tokens,
        "span_shape": list(cache.placement.span_shape),
        "spans": span_count,
        "layers": [] if cache.padded else streams[0],
    }
    if cache.padded:
        meta["rows"] = [{"pads": pads, "layers": stream} for pads, stream in zip(cache.pads, streams)]
    return meta


def _span_ids(ids: torch.Tensor, shape: tuple[int, int], meta: dict[str, Any], path: Path) -> torch.Tensor:
    """A layer's saved span ids, checked: [rows, spans] int64, each naming one of the file's spans."""
    if tuple(ids.shape) != shape or ids.dtype != torch.int64 or (ids.numel() and not
                                                                   0 <= int(ids.min()) <= int(ids.max()) < meta["spans"]):
        raise CorruptCacheError(f"{str(path)!r}: a layer's span ids do not name {shape[0]} x {shape[1]} of the "
                                f"file's {meta['spans']} spans")
    return ids


def _streams_meta(meta: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Each saved stream's per-layer entries: the rows' of a padded batch, else the one stream of all rows."""
    return [row["layers"] for row in meta["rows"]] if "rows" in meta else [meta["layers"]]


class _NoLock:
    """The lock put_records takes around map resizes: nobody else reads a file being saved."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


# ---- load ---------------------------------------------------------------------------------------------------------
def load_cache(cls, path: Path, model, placement: dict[str, Any]):
    unknown = sorted(set(placement) - set(PLACEMENT_FIELDS))
    if unknown:
        raise ValueError(f"load() can only set {list(PLACEMENT_FIELDS)}; the rest comes from the saved cache (got {unknown})")
    env = _open(path)
    try:
        meta = _read_meta(env, path)
        _check_model(meta, model, path)
        config = ReAttentionConfig.from_dict(meta["config"]).replace(**placement)
        cache = cls(model, config)
        _restore(cache, env, meta, path, model)
    except BaseException:
        release_saved(env)
        raise
    return cache


def _open(path: Path) -> lmdb.Environment:
    if not path.exists():
        raise CacheFileNotFoundError(f"no saved kvtier cache at {str(path)!r}; save one with cache.save(path)")
    if path.is_dir():
        raise CorruptCacheError(f"{str(path)!r} is a directory, not a kvtier cache file")
    try:
        return open_saved(path)
    except lmdb.Error as err:
        raise CorruptCacheError(f"{str(path)!r} is not a kvtier cache (LMDB cannot open it: {err})") from None


def _read_meta(env: lmdb.Environment, path: Path) -> dict[str, Any]:
    with env.begin() as txn:
        raw = txn.get(b"meta")
    if raw is None:
        raise CorruptCacheError(f"{str(path)!r} has no metadata record: it is not a complete kvtier cache")
    meta = records.decode_json(raw, "meta")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptCacheError(f"{str(path)!r} is not a kvtier cache (its metadata names no kvtier format)")
    if meta.get("version") not in (LEGACY_VERSION, VERSION):
        raise IncompatibleCacheError(
            f"{str(path)!r} was written in kvtier cache format {meta.get('version')} (kvtier {meta.get('kvtier')}); "
            f"this kvtier reads formats {LEGACY_VERSION} and {VERSION}: re-run the prefill and save again"
        )
    missing = sorted(_META_KEYS - set(meta))
    if missing:
        raise CorruptCacheError(f"{str(path)!r}: the metadata lacks {missing}")
    layers = [layer for stream in _streams_meta(meta) for layer in stream]
    policy_records = sum(len(layer.get("policy_state", ())) for layer in layers)
    per_layer = len(_LAYER_TENSORS) + (meta["version"] == VERSION)  # and the span ids since format 3
    expected = meta["spans"] + len(layers) * per_layer + policy_records + 1 + bool(meta["token_ids"])
    if env.stat()["entries"] != expected:
        raise CorruptCacheError(f"{str(path)!r} holds {env.stat()['entries']} records, its metadata says {expected}")
    return meta


def _check_model(meta: dict[str, Any], model, path: Path) -> None:
    saved = dict(meta["fingerprint"], dtype=meta["dtype"])
    current = dict(fingerprint(model), dtype=str(model.dtype).removeprefix("torch."))
    differs = [f"{key}: saved {saved.get(key)!r}, model {value!r}" for key, value in current.items() if saved.get(key) != value]
    if differs:
        raise IncompatibleCacheError(
            f"{str(path)!r} was saved for another model ({'; '.join(differs)}); load it with the model (and dtype) "
            "that produced it"
        )


def _restore(cache, env: lmdb.Environment, meta: dict[str, Any], path: Path, model) -> None:
    decoder_layers = model.get_decoder().layers
    with env.begin(buffers=True) as txn:
        def tensor(key: bytes) -> torch.Tensor:
            raw = txn.get(key)
            if raw is None:
                raise CorruptCacheError(f"{str(path)!r}: record {key.decode()!r} is missing")
            return records.decode_tensor(raw, key.decode())

        padded = "rows" in meta
        if padded:
            cache.restore_padding([row["pads"] for row in meta["rows"]], meta["tokens"])
        rows = 1 if padded else meta["batch"]  # rows each saved layer holds
        saved_uid = 0
        for prefix, (stream, policy), infos in zip(_prefixes(meta["batch"], padded), cache.streams(), _streams_meta(meta)):
            for index, (layer, info) in enumerate(zip(stream, infos)):
                device = next(decoder_layers[index].parameters()).device
                state = {name: tensor(_layer_key(prefix, index, name)).to(device) for name in _LAYER_TENSORS}
                count = info["spans"] * rows
                uids = (_span_ids(tensor(_layer_key(prefix, index, _SPAN_IDS)), (rows, info["spans"]), meta, path)
                        if meta["version"] == VERSION else torch.arange(saved_uid, saved_uid + count).view(rows, -1))
                layer.restore(state, uids, info["seen"], info["largest_scope"])
                policy.restore_layer_state(index, {name: tensor(_layer_key(prefix, index, _POLICY + name)).to(device)
                                                   for name in info.get("policy_state", [])})
                saved_uid += count
        if meta["token_ids"]:
            cache.record_tokens(tensor(b"tokens"))
    span_shape = tuple(meta["span_shape"])
    dtype = records.DTYPES[meta["dtype"]]
    store = LmdbStore.saved(env, path, span_shape, dtype, meta["spans"])
    for placement in cache.placements:  # one per device the layers are on: each reads the saved spans from the file
        placement.attach_saved(store, meta["spans"])
