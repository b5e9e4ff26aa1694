"""Beams over one long prompt, held once and held apart: `model.generate(ids, num_beams=n)` repeats the prompt n times
before its prefill; kvtier holds rows fed the same ids once (kvtier.sharing) until their tokens differ. The same
beams run once from the ids (shared) and once from the prompt's embeddings, which carry no ids (held apart, as
before sharing), in one run: the time of each generate, the spans each cache stores, and whether the beams agree.
Writes shared_prompt.json into --out; prints the table last.

    python benchmarks/shared_prompt.py --length 8k --beams 4 --out runs/shared
    python benchmarks/shared_prompt.py --quick     # a tiny random Llama on the CPU: checks the script
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from kvtier.cache import ReAttentionCache
from kvtier.tools.args import (add_device_options, add_script_options, apply_device_options, format_length, length,
                               positive, versions)
from kvtier.tools.corpus import tokenized_corpus
from kvtier.tools.measure import sync
from kvtier.tools.model import load_model
from kvtier.tools.output import default_out, print_report, write_json
from kvtier.tools.tasks import build_task_sample

QUICK_SIZES = dict(global_size=4, local_size=64, span_size=8, top_k=4, chunk_size=16)


def run(model, prompt: torch.Tensor, config, beams: int, new_tokens: int, shared: bool) -> dict[str, Any]:
    """One beam search over `prompt` [1, T] in a new cache, from its ids (shared) or its embeddings (apart)."""
    cache = ReAttentionCache(model, config)
    inputs = {"input_ids": prompt} if shared else {"inputs_embeds": model.get_input_embeddings()(prompt)}
    sync()
    began = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, past_key_values=cache, num_beams=beams, num_return_sequences=beams,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    sync()
    seconds = time.perf_counter() - began
    stats = cache.stats()
    cache.close()
    answers = out[:, prompt.shape[1]:] if shared else out  # generate from embeddings returns the new tokens only
    return {"seconds": seconds, "spans": sum(stats["spans"].values()), "answers": answers.tolist()}


def format_table(result: dict[str, Any]) -> str:
    shared, apart = result["shared"], result["apart"]
    return "\n".join([
        f"{result['beams']} beams over a {format_length(result['length'])}-token prompt, {result['new_tokens']} new tokens:",
        "| | generate s | spans stored |", "|---|---|---|",
        f"| held apart (embeddings) | {apart['seconds']:.1f} | {apart['spans']:,} |",
        f"| held once (ids) | {shared['seconds']:.1f} | {shared['spans']:,} |",
        f"| ratio apart / once | {apart['seconds'] / shared['seconds']:.2f}x | {apart['spans'] / max(shared['spans'], 1):.2f}x |",
        f"same beams: {'yes' if result['same_beams'] else 'NO'}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=length, default=None, help="prompt tokens, e.g. 8k (default 8k; --quick 600)")
    parser.add_argument("--beams", type=positive, default=4, help="num_beams, and sequences returned (default 4)")
    parser.add_argument("--new-tokens", type=positive, default=16, help="tokens generated (default 16)")
    add_script_options(parser, "shared_prompt.json", "shared_prompt")
    add_device_options(parser)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    device, dtype = apply_device_options(args, quick=args.quick)
    model, tokenizer, model_name = load_model(args.quick, device, dtype)
    config = ReAttentionCache(model, **(QUICK_SIZES if args.quick else {})).config
    size = args.length or (600 if args.quick else 8192)
    sample = build_task_sample(tokenized_corpus(tokenizer), size, 0.5, draw=f"shared:{size}")
    prompt = torch.tensor([sample.ids], device=device)
    apart = run(model, prompt, config, args.beams, args.new_tokens, shared=False)
    shared = run(model, prompt, config, args.beams, args.new_tokens, shared=True)
    result = {"command": ["python", "benchmarks/shared_prompt.py", *argv], "versions": versions(), "model": model_name,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
              "date": time.strftime("%Y-%m-%d"), "config": config.to_dict(), "length": sample.length,
              "beams": args.beams, "new_tokens": args.new_tokens, "apart": apart, "shared": shared,
              "same_beams": apart["answers"] == shared["answers"]}
    out = args.out or default_out("shared_prompt")
    print_report([write_json(out / "shared_prompt.json", result)], format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
