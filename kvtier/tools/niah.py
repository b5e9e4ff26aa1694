"""Needle-in-a-haystack sweeps: passkey retrieval over lengths x depths, with the stock cache or a kvtier config."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvtier.cache import ReAttentionCache
from kvtier.hf import cache_keyword
from kvtier.config import ReAttentionConfig
from kvtier.tools.haystack import build_sample, draw_key, passkey_found
from kvtier.tools.memory import release_memory
from kvtier.tools.model import window_of

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


@dataclass(frozen=True)
class BatchAnswer:
    """Greedy answers to a batch of prompts that ran as one: the times are the whole batch's."""

    tokens: list[list[int]]  # one answer per row, each cut after its first end-of-sequence token (as batch 1 stops)
    prefill_s: float
    decode_s: float


def answer(model, ids: list[int], cache, max_new_tokens: int, prefill_chunk: int = PREFILL_CHUNK,
           progress: bool = False) -> Answer:
    """Greedy answer to the prompt `ids`: a chunked prefill into `cache` (a bar per chunk if `progress`), then
    `model.generate` continues from the filled cache. The one-row case of `answer_batch`."""
    result = answer_batch(model, [ids], cache, max_new_tokens, prefill_chunk, progress)
    return Answer(result.tokens[0], result.prefill_s, result.decode_s)


def answer_batch(model, ids: torch.Tensor | Sequence[Sequence[int]], cache, max_new_tokens: int,
                 prefill_chunk: int = PREFILL_CHUNK, progress: bool = False) -> BatchAnswer:
    """Greedy answers to B prompts of the same length, `ids` [B, T] (no padding): a chunked prefill of the first T-1
    tokens of every row into `cache` (a new one, for B rows), then `model.generate` continues all rows from it.

    One forward carries all B rows, so on a GPU, where a long prefill is bound by per-layer host overhead, B rows
    cost about the time of one. Rows that end (end-of-sequence) before others are cut there, as a lone row stops."""
    if not isinstance(ids, torch.Tensor) and len({len(row) for row in ids}) > 1:
        raise ValueError(f"answer_batch runs rows of one length (no padding), got {sorted({len(r) for r in ids})}")
    prompt = torch.as_tensor(ids, dtype=torch.long, device=model.device)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"answer_batch needs token ids [batch, length] with length >= 1, got {tuple(prompt.shape)}")
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
    stops = _eos_ids(model)
    rows = [_until_eos(row, stops) for row in out[:, prompt.shape[1]:].tolist()]
    return BatchAnswer(rows, prefilled - began, done - prefilled)


def _eos_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(token) for token in eos}


def _until_eos(tokens: list[int], stops: set[int]) -> list[int]:
    """`tokens` up to and including the first end-of-sequence token: generate pads a finished row of a batch."""
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[:position + 1]
    return tokens


def group_batches(token_counts: Sequence[int], batch: int) -> list[list[int]]:
    """Positions into `token_counts` in batches of up to `batch` prompts with exactly the same token count (nothing
    is padded or cut). Within a count the positions stay in order; batches are ordered by their first position."""
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive whole number, got {batch!r}")
    by_count: dict[int, list[int]] = {}
    for position, count in enumerate(token_counts):
        by_count.setdefault(count, []).append(position)
    groups = [positions[start:start + batch] for positions in by_count.values()
              for start in range(0, len(positions), batch)]
    return sorted(groups, key=lambda group: group[0])


def run_niah(model, tokenizer, method: Method, lengths: Iterable[int], depths: Iterable[float], keys: int = 1,
             seed: int = 0, max_new_tokens: int = 10, prefill_chunk: int = PREFILL_CHUNK,
             distractors: int = 0, batch: int = 1,
             on_batch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Passkey accuracy of `method` on every (length, depth) cell, `keys` prompts per cell, greedy decoding; with
    `distractors`, each prompt also holds that many other labelled keys (kvtier.tools.haystack.build_sample).

    With `batch` > 1, the prompts of one length are run up to `batch` at a time, those of the same token count
    together (`group_batches`): one cache, one chunked prefill and one `generate` per batch, each row scored on its
    own. Every row of a batch is held at once (B times the KV of one prompt).

    Returns a JSON-ready dict: the method's label and config, the grid, and one record per sample, in cell order
    (length, depth, key index). A record's "batch" is the size of the batch it ran in, and its "prefill_s" and
    "decode_s" are that batch's seconds (shared by its rows, not divided among them); "stats" (kvtier) are its
    cache's, also shared.

    on_batch, when given, receives the run so far (its "samples": the prompts answered, "complete": False) after
    every batch, e.g. to save a long sweep as it goes."""
    group_batches([], batch)  # a bad batch fails before the first prompt is built
    lengths, depths = list(lengths), list(depths)
    cells = [(depth, index) for depth in depths for index in range(keys)]
    samples, hits, done = [], 0, 0
    grid = {"label": method.label, "config": None if method.config is None else method.config.to_dict(),
            "lengths": lengths, "depths": depths, "keys": keys, "distractors": distractors, "seed": seed,
            "max_new_tokens": max_new_tokens, "batch": batch}
    bar = tqdm(total=len(lengths) * len(cells), desc=method.label, unit="prompt")
    for length in lengths:  # one length's prompts at a time: at 1M tokens each prompt's ids are ~8 MB of Python
        prompts = [build_sample(tokenizer, length, depth, draw_key(seed, length, depth, index), distractors)
                   for depth, index in cells]
        records: list[dict[str, Any] | None] = [None] * len(prompts)
        for group in group_batches([prompt.length for prompt in prompts], batch):
            cache = method.new_cache(model)
            result = answer_batch(model, [prompts[position].ids for position in group], cache, max_new_tokens,
                                  prefill_chunk, progress=True)  # a bar per batch's prefill: minutes at 1M tokens
            stats = cache.stats() if method.config is not None else None
            for position, tokens in zip(group, result.tokens):
                sample, depth = prompts[position], cells[position][0]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                hit = passkey_found(text, sample.key)
                record = {"length": length, "tokens": sample.length, "depth": depth, "key": sample.key, "hit": hit,
                          "answer": text, "prefill_s": round(result.prefill_s, 3),
                          "decode_s": round(result.decode_s, 3), "batch": len(group)}
                if distractors:
                    record["distractor_keys"] = list(sample.distractor_keys)
                    record["took_distractor"] = any(passkey_found(text, key) for key in sample.distractor_keys)
                if stats is not None:
                    record["stats"] = stats
                records[position] = record
            del cache  # before the next batch's cache fills
            release_memory(model.device)
            hits += sum(records[position]["hit"] for position in group)
            done += len(group)
            bar.update(len(group))
            depths_run = ",".join(f"{cells[position][0]:g}" for position in group)
            bar.set_postfix_str(f"found {hits}/{done}, last: {len(group)} x {prompts[group[0]].length} tokens, "
                                f"depth {depths_run}")
            if on_batch is not None:
                answered = samples + [record for record in records if record is not None]
                on_batch({**grid, "samples": answered, "complete": False})
        samples += records
    bar.close()
    return {**grid, "samples": samples, "complete": True}


def run_comparison(model, tokenizer, methods: Iterable[Method], lengths: Iterable[int], depths: Iterable[float],
                   batch: int = 1, on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
                   **sweep: Any) -> list[dict[str, Any]]:
    """run_niah for each method on the same prompts (same seed, so the same keys), `batch` prompts at a time;
    on_batch, when given, receives every run so far (the last one partial) after each batch."""
    lengths, depths = list(lengths), list(depths)
    runs: list[dict[str, Any]] = []
    for method in methods:
        report = None if on_batch is None else (lambda partial: on_batch(runs + [partial]))
        runs.append(run_niah(model, tokenizer, method, lengths, depths, batch=batch, on_batch=report, **sweep))
    return runs
