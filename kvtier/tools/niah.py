"""Needle-in-a-haystack sweeps over lengths x depths, with the stock cache or a kvtier config: RULER's needle tasks in
natural prose (kvtier.tools.tasks), or the passkey in repeated filler (kvtier.tools.haystack)."""
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
from kvtier.tools.corpus import TokenizedCorpus, tokenized_corpus
from kvtier.tools.haystack import build_sample, draw_key, passkey_found
from kvtier.tools.memory import release_memory
from kvtier.tools.model import window_of
from kvtier.tools.tasks import TASKS, answer_tokens, build_task_sample, needle_count, score

STOCK = "stock"
# natural: RULER's tasks in the packaged prose (kvtier.tools.corpus); filler: the passkey in five repeated sentences,
# whose only task is the passkey (its --distractors variant included).
HAYSTACKS = ("natural", "filler")
PASSKEY = "passkey"
FILLER_ANSWER_TOKENS = 10
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
    """Greedy answers to B prompts, `ids` [B, T] or B lists of ids (of any lengths: the shorter rows are left-padded,
    as a tokenizer with padding_side="left" pads them): a chunked prefill of the first T-1 columns of every row into
    `cache` (a new one, for B rows), then `model.generate` continues all rows from it.

    One forward carries all B rows, so on a GPU, where a long prefill is bound by per-layer host overhead, B rows
    cost about the time of one. Rows that end (end-of-sequence) before others are cut there, as a lone row stops."""
    prompt, mask = _left_padded(ids, model.device)
    cache_kwarg = cache_keyword(model)
    starts = range(0, prompt.shape[1] - 1, prefill_chunk)
    with torch.inference_mode():
        began = time.perf_counter()
        for start in tqdm(starts, desc="prefill", unit="chunk", disable=not progress, leave=False):
            end = min(start + prefill_chunk, prompt.shape[1] - 1)
            model(input_ids=prompt[:, start:end], attention_mask=mask[:, :end], use_cache=True, logits_to_keep=1,
                  **{cache_kwarg: cache})
        if prompt.is_cuda:  # kernels run asynchronously: wait for the prefill's before reading the clock
            torch.cuda.synchronize(prompt.device)
        prefilled = time.perf_counter()
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             **{cache_kwarg: cache})
        done = time.perf_counter()
    stops = _eos_ids(model)
    rows = [_until_eos(row, stops) for row in out[:, prompt.shape[1]:].tolist()]
    return BatchAnswer(rows, prefilled - began, done - prefilled)


def _left_padded(ids: torch.Tensor | Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] or B rows of ids -> (ids [B, T] with the shorter rows left-padded with 0, mask [B, T]) on
    `device`."""
    rows = ids.tolist() if isinstance(ids, torch.Tensor) and ids.dim() == 2 else ids
    if isinstance(rows, torch.Tensor) or not rows or min(map(len, rows)) == 0:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else f"{len(rows)} rows"
        raise ValueError(f"answer_batch needs token ids [batch, length] with length >= 1, got {shape}")
    width = max(map(len, rows))
    prompt = torch.tensor([[0] * (width - len(row)) + list(row) for row in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long, device=device)
    return prompt, mask


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


def build_prompts(tokenizer, corpus, setup: dict[str, Any], length: int, cells: Sequence[tuple[float, int]],
                  seed: int) -> list:
    """The prompts of one length, one per (depth, key index) cell: with `corpus` (natural text) RULER's task of
    `setup` (kvtier.tools.tasks.build_task_sample), else the filler passkey with setup's distractors."""
    if corpus is None:
        return [build_sample(tokenizer, length, depth, draw_key(seed, length, depth, index), setup["distractors"])
                for depth, index in cells]
    return [build_task_sample(corpus, length, depth, setup["task"], setup["needles"],
                              draw=f"{seed}:{length}:{depth}:{index}") for depth, index in cells]


def run_niah(model, tokenizer, method: Method, lengths: Iterable[int], depths: Iterable[float], keys: int = 1,
             seed: int = 0, max_new_tokens: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
             distractors: int = 0, batch: int = 1,
             on_batch: Callable[[dict[str, Any]], None] | None = None, haystack: str = "natural",
             task: str | None = None, needles: int = 4) -> dict[str, Any]:
    """Accuracy of `method` on every (length, depth) cell, `keys` prompts per cell, greedy decoding, scored per
    needle. The prompts: with haystack "natural", RULER's `task` (niah_single by default, or multikey, multivalue,
    multiquery with `needles` needles; kvtier.tools.tasks.build_task_sample) in the packaged prose; with "filler",
    the passkey (task None or "passkey") with `distractors` other labelled keys (kvtier.tools.haystack.build_sample).
    max_new_tokens defaults to what the task's answer needs (10 for the passkey).

    With `batch` > 1, the prompts of one length are run up to `batch` at a time, those of the same token count
    together (`group_batches`): one cache, one chunked prefill and one `generate` per batch, each row scored on its
    own. Every row of a batch is held at once (B times the KV of one prompt).

    Returns a JSON-ready dict: the method's label and config, the grid and the task (with the corpus' name, sha256
    and length in tokens for natural text), and one record per sample, in cell order (length, depth, key index):
    its answer, "hit", for natural text "found" / "asked" (needles) and each needle with its value and whether the
    answer holds it, and "needle_spans" ([start, end) token ranges of the needles in the prompt). A record's
    "batch" is the size of the batch it ran in, and its "prefill_s" and "decode_s" are that batch's seconds (shared
    by its rows, not divided among them); "stats" (kvtier) are its cache's, also shared.

    on_batch, when given, receives the run so far (its "samples": the prompts answered, "complete": False) after
    every batch, e.g. to save a long sweep as it goes."""
    group_batches([], batch)  # a bad batch fails before the first prompt is built
    setup = sweep_task(haystack, task, needles, distractors)
    if max_new_tokens is None:
        max_new_tokens = default_answer_tokens(setup)
    lengths, depths = list(lengths), list(depths)
    cells = [(depth, index) for depth in depths for index in range(keys)]
    corpus = tokenized_corpus(tokenizer) if haystack == "natural" else None
    samples, found, asked, done = [], 0, 0, 0
    grid = {"label": method.label, "config": None if method.config is None else method.config.to_dict(),
            "lengths": lengths, "depths": depths, "keys": keys, **setup, "seed": seed,
            "max_new_tokens": max_new_tokens, "batch": batch}
    if corpus is not None:
        grid["corpus"] = corpus.info()
    bar = tqdm(total=len(lengths) * len(cells), desc=method.label, unit="prompt")
    for length in lengths:  # one length's prompts at a time: at 1M tokens each prompt's ids are ~8 MB of Python
        prompts = build_prompts(tokenizer, corpus, setup, length, cells, seed)
        records: list[dict[str, Any] | None] = [None] * len(prompts)
        for group in group_batches([prompt.length for prompt in prompts], batch):
            cache = method.new_cache(model)
            result = answer_batch(model, [prompts[position].ids for position in group], cache, max_new_tokens,
                                  prefill_chunk, progress=True)  # a bar per batch's prefill: minutes at 1M tokens
            stats = cache.stats() if method.config is not None else None
            for position, tokens in zip(group, result.tokens):
                sample, depth = prompts[position], cells[position][0]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                record = {"length": length, "tokens": sample.length, "depth": depth, "key": sample.key,
                          **_scores(sample, text, corpus), "answer": text, "prefill_s": round(result.prefill_s, 3),
                          "decode_s": round(result.decode_s, 3), "batch": len(group),
                          "needle_spans": [list(span) for span in sample.needle_spans]}
                if stats is not None:
                    record["stats"] = stats
                records[position] = record
            del cache  # before the next batch's cache fills
            release_memory(model.device)
            found += sum(records[position].get("found", records[position]["hit"]) for position in group)
            asked += sum(records[position].get("asked", 1) for position in group)
            done += len(group)
            bar.update(len(group))
            depths_run = ",".join(f"{cells[position][0]:g}" for position in group)
            bar.set_postfix_str(f"found {found}/{asked}, last: {len(group)} x {prompts[group[0]].length} tokens, "
                                f"depth {depths_run}")
            if on_batch is not None:
                answered = samples + [record for record in records if record is not None]
                on_batch({**grid, "samples": answered, "complete": False})
        samples += records
    bar.close()
    return {**grid, "samples": samples, "complete": True}


def _scores(sample, answer_text: str, corpus: TokenizedCorpus | None) -> dict[str, Any]:
    """A record's scoring fields: for the passkey (no corpus) "hit" and, with distractors, their keys and whether the
    answer gave one; for a RULER task its per-needle score (kvtier.tools.tasks.score), where the haystack starts in
    the corpus and whether it went round it ("repeats")."""
    if corpus is None:
        fields: dict[str, Any] = {"hit": passkey_found(answer_text, sample.key)}
        if sample.distractor_keys:
            fields["distractor_keys"] = list(sample.distractor_keys)
            fields["took_distractor"] = any(passkey_found(answer_text, key) for key in sample.distractor_keys)
        return fields
    return {**score(sample, answer_text), "corpus_start": sample.corpus_start,
            "repeats": sample.corpus_sentences > len(corpus)}


def sweep_task(haystack: str, task: str | None = None, needles: int = 4, distractors: int = 0) -> dict[str, Any]:
    """A sweep's task as its results record it: haystack, task, needles per prompt and distractors; ValueError naming
    the fix for a combination that does not exist."""
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; choose from {', '.join(HAYSTACKS)}")
    if haystack == "filler":
        if task not in (None, PASSKEY):
            raise ValueError(f"the filler haystack has one task, the passkey ({PASSKEY}); {task} runs in natural text "
                             f"(haystack 'natural')")
        return {"haystack": haystack, "task": PASSKEY, "needles": 1 + distractors, "distractors": distractors}
    if distractors:
        raise ValueError("distractors belong to the filler passkey; in natural text run the multikey task, whose "
                         "needles other than the asked one are distractors")
    task = task or TASKS[0]
    return {"haystack": haystack, "task": task, "needles": needle_count(task, needles), "distractors": 0}


def default_answer_tokens(setup: dict[str, Any]) -> int:
    """The answer length a sweep's task needs (`sweep_task`'s dict)."""
    if setup["task"] == PASSKEY:
        return FILLER_ANSWER_TOKENS
    return answer_tokens(setup["task"], setup["needles"])


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
