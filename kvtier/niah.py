"""Needle-in-a-haystack sweeps: passkey retrieval over lengths x depths, with the stock cache or a kvtier config."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvtier.cache import ReAttentionCache
from kvtier.hf import cache_keyword
from kvtier.config import ReAttentionConfig
from kvtier.haystack import build_sample, draw_key, passkey_found
from kvtier.model import window_of

STOCK = "stock"
# Bounds the activations of a long prefill (the KV of a 135M model is small; a 16K-token forward is not).
PREFILL_CHUNK = 2048


@dataclass(frozen=True)
class Method:
    """What holds the KV during a run: transformers' DynamicCache (config None) or a ReAttentionCache."""

    config: ReAttentionConfig | None = None

    @property
    def label(self) -> str:
        c = self.config
        if c is None:
            return STOCK
        middle = "" if c.policy == "streaming" else f" k{c.top_k}x{c.span_size}"  # streaming selects no span
        return f"{c.policy} G{c.global_size}{middle} W{c.local_size} C{c.chunk_size}"

    def new_cache(self, model):
        if self.config is None:
            return DynamicCache(config=model.config)
        return ReAttentionCache(model, self.config)


def kvtier_method(model, base: ReAttentionConfig | None = None, **overrides: Any) -> Method:
    """A kvtier Method: `base` (default: all derived) with `overrides`, resolved and validated for `model` now,
    so a bad config fails before the first long prompt is built."""
    config = (base or ReAttentionConfig()).replace(**overrides).resolve(window_of(model))
    return Method(config)


@dataclass(frozen=True)
class Answer:
    tokens: list[int]
    prefill_s: float  # all prompt tokens but the last, fed in chunks
    decode_s: float   # generate(): the last prompt token, then one token per step


def answer(model, ids: list[int], cache, max_new_tokens: int, prefill_chunk: int = PREFILL_CHUNK,
           progress: bool = False) -> Answer:
    """Greedy answer to the prompt `ids`: a chunked prefill into `cache` (a bar per chunk if `progress`), then
    `model.generate` continues from the filled cache."""
    prompt = torch.tensor([ids], device=model.device)
    cache_kwarg = cache_keyword(model)
    starts = range(0, prompt.shape[1] - 1, prefill_chunk)
    with torch.inference_mode():
        began = time.perf_counter()
        for start in tqdm(starts, desc="prefill", unit="chunk", disable=not progress, leave=False):
            chunk = prompt[:, start:min(start + prefill_chunk, prompt.shape[1] - 1)]
            model(input_ids=chunk, use_cache=True, logits_to_keep=1, **{cache_kwarg: cache})
        if prompt.is_cuda:  # kernels run asynchronously: wait for the prefill's before reading the clock
            torch.cuda.synchronize(prompt.device)
        prefilled = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             do_sample=False, **{cache_kwarg: cache})
        done = time.perf_counter()
    return Answer(out[0, prompt.shape[1]:].tolist(), prefilled - began, done - prefilled)


def run_niah(model, tokenizer, method: Method, lengths: Iterable[int], depths: Iterable[float], keys: int = 1,
             seed: int = 0, max_new_tokens: int = 10, prefill_chunk: int = PREFILL_CHUNK,
             distractors: int = 0) -> dict[str, Any]:
    """Passkey accuracy of `method` on every (length, depth) cell, `keys` prompts per cell, greedy decoding; with
    `distractors`, each prompt also holds that many other labelled keys (kvtier.haystack.build_sample).

    Returns a JSON-ready dict: the method's label and config, the grid, and one record per sample."""
    lengths, depths = list(lengths), list(depths)
    cells = [(length, depth, index) for length in lengths for depth in depths for index in range(keys)]
    samples, hits = [], 0
    bar = tqdm(cells, desc=method.label, unit="prompt")
    for length, depth, index in bar:
        sample = build_sample(tokenizer, length, depth, draw_key(seed, length, depth, index), distractors)
        cache = method.new_cache(model)
        result = answer(model, sample.ids, cache, max_new_tokens, prefill_chunk)
        text = tokenizer.decode(result.tokens, skip_special_tokens=True)
        hit = passkey_found(text, sample.key)
        hits += hit
        record = {"length": length, "tokens": sample.length, "depth": depth, "key": sample.key, "hit": hit,
                  "answer": text, "prefill_s": round(result.prefill_s, 3), "decode_s": round(result.decode_s, 3)}
        if distractors:
            record["distractor_keys"] = list(sample.distractor_keys)
            record["took_distractor"] = any(passkey_found(text, key) for key in sample.distractor_keys)
        if method.config is not None:
            record["stats"] = cache.stats()
        samples.append(record)
        bar.set_postfix_str(f"found {hits}/{len(samples)}, last: {sample.length} tokens, depth {depth:g}")
    return {
        "label": method.label,
        "config": None if method.config is None else method.config.to_dict(),
        "lengths": lengths,
        "depths": depths,
        "keys": keys,
        "distractors": distractors,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "samples": samples,
    }


def run_comparison(model, tokenizer, methods: Iterable[Method], lengths: Iterable[int], depths: Iterable[float],
                   **sweep: Any) -> list[dict[str, Any]]:
    """run_niah for each method on the same prompts (same seed, so the same keys)."""
    lengths, depths = list(lengths), list(depths)
    return [run_niah(model, tokenizer, method, lengths, depths, **sweep) for method in methods]
