"""Several threads generating at once with one model object: each with its own ReAttentionCache, or one of them with
a stock DynamicCache, every thread gets the tokens it gets when the runs go one by one (issue 18, item 4: the hooks
kept ContextVar reset tokens on the shared decoder module, and a second thread's forward crashed on them)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import torch
from transformers import DynamicCache

from kvtier import ReAttentionCache
from tests.conftest import greedy, random_ids, tiny_model

TINY = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)  # a 40-token scope: selection runs


def _caches(model, kinds):
    return [DynamicCache(config=model.config) if kind == "stock" else ReAttentionCache(model, **TINY) for kind in kinds]


def test_threads_with_their_own_caches_generate_what_they_generate_one_by_one():
    model = tiny_model("llama")
    kinds = ["kvtier", "kvtier", "stock", "kvtier"]
    prompts = [random_ids(90, seed=seed) for seed in range(len(kinds))]
    alone = [greedy(model, ids, cache, new_tokens=16) for ids, cache in zip(prompts, _caches(model, kinds))]
    start = Barrier(len(kinds))  # all threads inside generate at once

    def run(ids, cache):
        start.wait()
        return greedy(model, ids, cache, new_tokens=16)

    for _ in range(3):  # interleavings differ from run to run
        with ThreadPoolExecutor(len(kinds)) as pool:
            together = list(pool.map(run, prompts, _caches(model, kinds)))
        for expected, got in zip(alone, together):
            assert torch.equal(expected, got)
