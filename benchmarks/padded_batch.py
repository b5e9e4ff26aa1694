"""Padded batch: RULER's niah_single in the packaged prose at several lengths, answered as one left-padded batch
(`tokenizer(prompts, padding=True)` with padding_side="left", one ReAttentionCache) and one prompt at a time (a cache
each), in one run: each row's answer and whether it found the needle in both, and the throughput of the two (prompt
tokens over the whole time, prefill and decode). Writes padded_batch.json into --out; prints the table last.

    python benchmarks/padded_batch.py --lengths 16k,32k,48k,64k,80k,96k,112k,128k --out runs/padded
    python benchmarks/padded_batch.py --quick     # a tiny random Llama on the CPU (meaningless tokens): checks it
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from kvtier.cache import ReAttentionCache
from kvtier.tools.args import (add_device_options, add_script_options, apply_device_options, format_length, fractions,
                               lengths, versions)
from kvtier.tools.corpus import tokenized_corpus
from kvtier.tools.measure import sync
from kvtier.tools.memory import release_memory
from kvtier.tools.model import load_model
from kvtier.tools.niah import PREFILL_CHUNK, answer, answer_batch
from kvtier.tools.output import default_out, print_report, write_json
from kvtier.tools.tasks import answer_tokens, build_task_sample, score

LENGTHS = [16_384 * n for n in range(1, 9)]  # 16K, 32K, ... 128K
# pads of 384, 192 and 0: multiples of --quick's 64-token prefill pieces, so each row is fed in the pieces it gets alone
# (a query chunk split by a piece border selects with the window ending at the border, so it may select otherwise)
QUICK_LENGTHS = [516, 708, 900]
DEPTHS = [0.5]
QUICK_SIZES = dict(global_size=4, local_size=64, span_size=8, top_k=4, chunk_size=16)  # most of a prompt sealed
TASK = "niah_single"


def run_alone(model, tokenizer, samples, config, max_new: int, prefill_chunk: int) -> tuple[list[dict[str, Any]], float]:
    """Each prompt with its own cache -> (per row: answer, found, times; the whole time in s)."""
    rows, began = [], time.perf_counter()
    for sample in samples:
        cache = ReAttentionCache(model, config)
        result = answer(model, list(sample.ids), cache, max_new, prefill_chunk)
        rows.append({"tokens": result.tokens, "prefill_s": result.prefill_s, "decode_s": result.decode_s,
                     **_scored(sample, result.tokens, tokenizer)})
        cache.close()
        release_memory(model.device)
    return rows, time.perf_counter() - began


def run_padded(model, tokenizer, samples, config, max_new: int, prefill_chunk: int) -> tuple[list[dict[str, Any]], dict]:
    """All prompts as one left-padded batch in one cache -> (per row: answer, found; the batch's times and stats)."""
    cache = ReAttentionCache(model, config)
    began = time.perf_counter()
    result = answer_batch(model, [list(sample.ids) for sample in samples], cache, max_new, prefill_chunk)
    sync()
    elapsed = time.perf_counter() - began
    stats = {"whole_s": elapsed, "prefill_s": result.prefill_s, "decode_s": result.decode_s, "padded": cache.padded,
             "pads": cache.pads, "max_position": cache.stats()["max_position"]}
    rows = [{"tokens": tokens, **_scored(sample, tokens, tokenizer)} for sample, tokens in zip(samples, result.tokens)]
    cache.close()
    release_memory(model.device)
    return rows, stats


def _scored(sample, tokens: list[int], tokenizer) -> dict[str, Any]:
    text = tokenizer.decode(tokens)
    return {"answer": text, "found": score(sample, text)["hit"]}


def format_table(result: dict[str, Any]) -> str:
    alone, padded = result["alone"], result["padded"]
    lines = ["| row | prompt | depth | alone: found | padded batch: found | same answer |", "|---|---|---|---|---|---|"]
    for index, (one, row) in enumerate(zip(alone["rows"], padded["rows"])):
        lines.append(f"| {index} | {format_length(result['lengths'][index])} | {result['depths'][index]:g} | "
                     f"{'yes' if one['found'] else 'no'} | {'yes' if row['found'] else 'no'} | "
                     f"{'yes' if one['tokens'] == row['tokens'] else 'no'} |")
    lines.append(f"| all | {format_length(sum(result['lengths']))} | | {alone['found']}/{len(alone['rows'])} | "
                 f"{padded['found']}/{len(padded['rows'])} | {result['same_answers']}/{len(alone['rows'])} |")
    lines.append("")
    lines.append(f"throughput (prompt tokens / whole time): alone {alone['tokens_per_s']:,.0f} tokens/s "
                 f"({alone['whole_s']:.1f} s), padded batch {padded['tokens_per_s']:,.0f} tokens/s "
                 f"({padded['whole_s']:.1f} s: prefill {padded['prefill_s']:.1f} s, decode {padded['decode_s']:.1f} s) "
                 f"= {result['throughput_ratio']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=lengths, default=None,
                        help="comma list of prompt lengths, a row each (default 16k,32k,...,128k; --quick 516,708,900)")
    parser.add_argument("--depths", type=fractions, default=None,
                        help="needle depth of each row, or one for all (default 0.5)")
    parser.add_argument("--policy", default=None, help="selection policy (default: kvtier's default)")
    add_script_options(parser, "padded_batch.json", "padded_batch")
    add_device_options(parser)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    prompt_lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
    depths = args.depths or DEPTHS
    if len(depths) not in (1, len(prompt_lengths)):
        parser.error(f"--depths gives {len(depths)} depths for {len(prompt_lengths)} lengths: give one, or one per length")
    depths = depths * len(prompt_lengths) if len(depths) == 1 else depths
    device, dtype = apply_device_options(args, quick=args.quick)
    model, tokenizer, model_name = load_model(args.quick, device, dtype)
    config = ReAttentionCache(model, **(QUICK_SIZES if args.quick else {}),
                              **({"policy": args.policy} if args.policy else {})).config
    corpus = tokenized_corpus(tokenizer)
    samples = [build_task_sample(corpus, size, depth, TASK, draw=f"padded:{size}:{depth}")
               for size, depth in zip(prompt_lengths, depths)]
    max_new = answer_tokens(TASK, 1)
    prefill_chunk = 64 if args.quick else PREFILL_CHUNK
    run_alone(model, tokenizer, samples[:1], config, max_new, prefill_chunk)  # warm-up: kernels compiled, pools made
    alone_rows, alone_s = run_alone(model, tokenizer, samples, config, max_new, prefill_chunk)
    padded_rows, padded = run_padded(model, tokenizer, samples, config, max_new, prefill_chunk)
    prompt_tokens = sum(sample.length for sample in samples)
    result = {
        "command": ["python", "benchmarks/padded_batch.py", *argv], "versions": versions(), "model": model_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
        "date": time.strftime("%Y-%m-%d"), "config": config.to_dict(), "task": TASK,
        "lengths": [sample.length for sample in samples], "depths": depths,
        "alone": {"rows": alone_rows, "whole_s": alone_s, "tokens_per_s": prompt_tokens / alone_s,
                  "found": sum(row["found"] for row in alone_rows)},
        "padded": {"rows": padded_rows, **padded, "tokens_per_s": prompt_tokens / padded["whole_s"],
                   "found": sum(row["found"] for row in padded_rows)},
        "same_answers": sum(one["tokens"] == row["tokens"] for one, row in zip(alone_rows, padded_rows)),
        "throughput_ratio": alone_s / padded["whole_s"],
    }
    out = args.out or default_out("padded_batch")
    print_report([write_json(out / "padded_batch.json", result)], format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
