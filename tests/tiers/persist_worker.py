"""Runs saved-cache jobs in a fresh Python process for tests/tiers/test_persist.py:

    python tests/tiers/persist_worker.py <jobs.json> <results.json>

jobs.json is a list of {"name", "action", ...}; results.json maps each name to what the job saw. Actions:

  continue           load "path" (with "placement"), then greedy-generate "new_tokens" from "ids"
  resave             load "path", save it to the same path, load it again; generate from both loaded caches
  load               load "path" and read every span back (for files that might crash a careless reader)
  save_on_full_disk  load "path", feed "ids" beyond the saved tokens, then save to "path" again with file writes
                     limited to "limit" bytes (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with EFBIG)

A job that raises records {"error": <exception class name>, "message": ...}. The test also imports `read_records`.
"""
from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lmdb
import numpy as np
import torch


def read_records(path: Path) -> dict[bytes, bytes]:
    """Every key -> value of a saved cache file, read with plain LMDB (read-only, no lock file)."""
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {bytes(key): bytes(value) for key, value in txn.cursor()}
    finally:
        env.close()


def _generate(model, ids: torch.Tensor, cache, new_tokens: int) -> list:
    from tests.conftest import greedy

    return greedy(model, ids, cache, new_tokens=new_tokens).tolist()


def _continue(job, model, cache_class):
    ids = torch.tensor(job["ids"])
    cache = cache_class.load(job["path"], model, **job.get("placement", {}))
    held = cache.token_ids
    loaded_tokens = cache.stats()["tokens"]
    tokens = _generate(model, ids, cache, job["new_tokens"])
    stats = cache.stats()
    return {
        "loaded_tokens": loaded_tokens,
        "token_ids_are_the_prefix": held is not None and torch.equal(held, ids[:, : held.shape[1]]),
        "tokens": tokens,
        "moved": stats["moved"],
    }


def _resave(job, model, cache_class):
    ids = torch.tensor(job["ids"])
    first = cache_class.load(job["path"], model)
    first.save(job["path"])  # reads its spans lazily from the file it replaces
    second = cache_class.load(job["path"], model)
    return {
        "tokens": _generate(model, ids, second, job["new_tokens"]),
        "first_load_tokens": _generate(model, ids, first, job["new_tokens"]),
    }


def _load(job, model, cache_class):
    cache = cache_class.load(job["path"], model)
    cache.placement.read_spans(np.arange(cache.placement.uids))
    return {"loaded_tokens": cache.get_seq_length()}


def _save_on_full_disk(job, model, cache_class):
    ids = torch.tensor(job["ids"])
    cache = cache_class.load(job["path"], model)
    with torch.inference_mode():
        model(ids[:, cache.get_seq_length() :], past_key_values=cache, use_cache=True)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["limit"], job["limit"]))
    cache.save(job["path"])
    return {"saved_tokens": cache.get_seq_length()}


ACTIONS = {"continue": _continue, "resave": _resave, "load": _load, "save_on_full_disk": _save_on_full_disk}


def main(jobs_path: str, results_path: str) -> None:
    from kvtier.cache import ReAttentionCache
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    results = {}
    for job in json.loads(Path(jobs_path).read_text()):
        try:
            results[job["name"]] = ACTIONS[job["action"]](job, model, ReAttentionCache)
        except Exception as err:
            results[job["name"]] = {"error": type(err).__name__, "message": str(err)}
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
