"""What every command and benchmark script measures with (kvtier.tools.measure, kvtier.tools.memory): the one decode
loop, the chunked prefill, the peak-memory reading and the GPU pool's growth estimate against a real DevicePool."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from kvtier.tiers.gpu import DevicePool
from kvtier.tools.measure import decode, prefill, step
from kvtier.tools.memory import peak_memory, pool_growth
from tests.conftest import greedy, random_ids, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def fed(model):
    """The input_ids of every forward of `model` during the test."""
    inputs = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(kwargs["input_ids"]),
                                           with_kwargs=True)
    yield inputs
    hook.remove()


def test_prefill_feeds_every_token_in_chunks_and_returns_seconds(model, fed):
    cache, ids = DynamicCache(config=model.config), random_ids(50)
    seconds = prefill(model, cache, ids, chunk=16)
    assert seconds > 0 and cache.get_seq_length() == 50
    assert [chunk.shape[1] for chunk in fed] == [16, 16, 16, 2] and torch.equal(torch.cat(fed, 1), ids)


def test_decode_times_the_steps_after_the_warmup_and_feeds_its_own_argmax(model, fed):
    ids = random_ids(20)
    expected = greedy(model, ids, new_tokens=6)[0]  # the greedy continuation
    cache = DynamicCache(config=model.config)
    first = step(model, cache, ids)  # [1, 1]
    assert first.item() == expected[0]
    fed.clear()
    times, last = decode(model, cache, first, steps=3, warmup=2)
    assert len(times) == 3 and all(ms > 0 for ms in times)
    assert [tokens.item() for tokens in fed] == expected[:5].tolist()  # each step's input: the previous argmax
    assert last.item() == expected[5] and cache.get_seq_length() == 20 + 5


def test_decode_feeds_what_feed_returns(model, fed):
    cache = DynamicCache(config=model.config)
    prefill(model, cache, random_ids(8), chunk=8)
    chunk = random_ids(4, seed=3)
    fed.clear()
    times, _ = decode(model, cache, torch.zeros(1, 1, dtype=torch.long), steps=2, feed=lambda token: chunk,
                      desc="with a bar")
    assert len(times) == 2 and all(torch.equal(tokens, chunk) for tokens in fed)
    assert cache.get_seq_length() == 8 + 2 * 4


def test_peak_memory_is_read_on_cuda_only():
    assert peak_memory(torch.device("cpu"), reset=True) is None


def _real_pool_growth(spans: int, capacity: int | None, per_call: int = 3) -> tuple[int, int]:
    """A DevicePool on the CPU given `spans` spans `per_call` at a time, as sealing adds them -> (slots allocated at
    the end, most slots allocated at once: the old and the new allocation while growing copies)."""
    pool = DevicePool((2, 1, 2, 4), torch.float32, torch.device("cpu"), capacity)
    peak = pool.data.shape[0]
    for first in range(0, spans if capacity is None else min(spans, capacity), per_call):
        last = min(first + per_call, spans if capacity is None else min(spans, capacity))
        before = pool.data.shape[0]
        pool.reserve(np.arange(first, last))
        if pool.data.shape[0] != before:
            peak = max(peak, before + pool.data.shape[0])
    return pool.data.shape[0], peak


@pytest.mark.parametrize("spans, capacity", [(10, None), (100, None), (1000, None), (100, 80), (3000, 1024),
                                             (5000, 200)])
def test_the_pool_growth_estimate_is_how_a_device_pool_grows(spans, capacity):
    assert tuple(pool_growth(spans, capacity)) == _real_pool_growth(spans, capacity)


def test_the_pool_growth_peak_holds_the_old_and_the_new_allocation():
    assert pool_growth(10) == (16, 16)  # the first allocation holds them
    assert pool_growth(100) == (128, 64 + 128)
    assert pool_growth(100, 80) == (80, 16 + 80)  # past 1/8 of a budget the pool takes all of it
    assert pool_growth(10**6, 8192).peak == 1024 + 8192  # the growth copy holds at most 1.125x the budget
    assert pool_growth(1_040_352).peak == (1 << 19) + (1 << 20)  # 8B at 1M: 192 GiB of 128 KiB spans at the peak
