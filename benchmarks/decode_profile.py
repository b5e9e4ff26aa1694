"""Where a decode step's time goes: stock DynamicCache against ReAttentionCache (Triton kernels and PyTorch
references) at one context, on the Llama-3.1-8B shape with random weights (or a tiny Llama with --quick).

Prints, per configuration: ms per step (median of --steps after a warm-up of one span cycle), GPU kernels and
copies launched per step and the time the GPU spent in them (CUDA profiler: a step far longer than its GPU time is
bound by the host), the host time of the step's Python frames (cProfile, top --top by own time), and the same per
layer. A step is one decoded token, or with --chunk N one prefill forward of N new tokens at the context's depth.
kvtier's context is filled with recorded K/V (kvtier.tools.longctx); stock's is a real chunked prefill.

    python benchmarks/decode_profile.py --context 8k --config benchmarks/configs/scope-8k.yaml --out $OUT/decode
    python benchmarks/decode_profile.py --context 128k --chunk 8192 --steps 4 ...   # a prefill forward instead
    python benchmarks/decode_profile.py --quick      # tiny shapes on the CPU: checks the script
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from kvtier.cache import ReAttentionCache
from kvtier.config import ReAttentionConfig
from kvtier.hf import cache_keyword
from kvtier.tools.longctx import fill, record_kv, sync
from kvtier.tools.model import random_llama

sys.path.insert(0, str(Path(__file__).parent))
from tiers import parse_tokens  # noqa: E402


def step(model, cache, tokens: torch.Tensor) -> torch.Tensor:
    """One forward over tokens [1, n] (a decode step when n = 1) -> the greedy next token [1, 1]."""
    logits = model(input_ids=tokens, logits_to_keep=1, **{cache_keyword(model): cache}).logits  # [1, 1, vocab]
    return logits[:, -1:].argmax(-1)


class Inputs:
    """What each step feeds: the previous step's token (decode), or --chunk fresh random ids [1, chunk]."""

    def __init__(self, chunk: int, vocab: int, device: str):
        self.chunk, self.vocab, self.device = chunk, vocab, device
        self.generator = torch.Generator().manual_seed(1)

    def next(self, token: torch.Tensor) -> torch.Tensor:
        if self.chunk == 1:
            return token
        return torch.randint(0, self.vocab, (1, self.chunk), generator=self.generator).to(self.device)


def timed_steps(model, cache, token: torch.Tensor, steps: int, warmup: int, inputs: Inputs
                ) -> tuple[list[float], torch.Tensor]:
    times = []
    for index in range(warmup + steps):
        tokens = inputs.next(token)
        began = time.perf_counter()
        token = step(model, cache, tokens)
        sync()
        if index >= warmup:
            times.append((time.perf_counter() - began) * 1e3)
    return times, token


def launches(model, cache, tokens: torch.Tensor) -> dict:
    """GPU kernels and copies one step launches, with the count of each kernel name, and the GPU's busy time in
    them (the sum of their durations)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(model, cache, tokens)
        sync()
    events = [event for event in prof.events() if event.device_type == DeviceType.CUDA]
    counts: dict[str, int] = {}
    for event in events:
        counts[event.name[:80]] = counts.get(event.name[:80], 0) + 1
    copies = sum(n for name, n in counts.items() if name.startswith(("Memcpy", "Memset")))
    busy_ms = sum(event.time_range.elapsed_us() for event in events) / 1e3
    return {"kernels": len(events) - copies, "copies": copies, "gpu_busy_ms": round(busy_ms, 3),
            "by_name": dict(sorted(counts.items(), key=lambda item: -item[1]))}


def host_profile(model, cache, token: torch.Tensor, steps: int, top: int, inputs: Inputs) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        token = step(model, cache, inputs.next(token))
    sync()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def profile_config(name: str, model, make_cache, prepare, args, layers: int) -> dict:
    cache = make_cache()
    token = prepare(cache)
    inputs = Inputs(args.chunk, model.config.vocab_size, token.device.type)
    with torch.inference_mode():
        times, token = timed_steps(model, cache, token, args.steps, args.warmup, inputs)
        counted = launches(model, cache, inputs.next(token)) if torch.cuda.is_available() else None
        report = host_profile(model, cache, token, args.profile_steps, args.top, inputs)
    median = statistics.median(times)
    row = {"config": name, "ms_median": round(median, 3), "ms_min": round(min(times), 3),
           "ms_per_layer": round(median / layers, 4), "launches": counted}
    busy = "" if counted is None else f", GPU busy {counted['gpu_busy_ms']:.2f} ms"
    print(f"\n=== {name}: {median:.2f} ms per step of {args.chunk} token(s) (min {min(times):.2f}), "
          f"{median / layers:.3f} ms per layer{busy}; "
          f"launches {None if counted is None else (counted['kernels'], counted['copies'])}")
    if counted is not None:
        for kernel, count in list(counted["by_name"].items())[:25]:
            print(f"  {count:5d}  {kernel}")
    print(report)
    del cache
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=parse_tokens, default=None, help="context tokens (default 8k; --quick 2k)")
    parser.add_argument("--config", type=Path, default=None, help="a ReAttentionConfig .yaml/.json for kvtier")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 32; --quick 4)")
    parser.add_argument("--chunk", type=parse_tokens, default=1,
                        help="new tokens per step: 1 = a decode step (default); e.g. 8k = one prefill forward at the "
                             "context's depth (the context grows by this much per step)")
    parser.add_argument("--profile-steps", type=int, default=8, help="decode steps under cProfile (default 8)")
    parser.add_argument("--top", type=int, default=30, help="cProfile rows printed per configuration (default 30)")
    parser.add_argument("--gpu-budget", default=None,
                        help="also profile kvtier (kernels=auto) with this gpu_budget, the rest in pinned host memory")
    parser.add_argument("--disk-path", default=None,
                        help="with --gpu-budget, also profile it with an LMDB tier in this folder (the CPU then learns "
                             "each layer's selection before its gather: the path the device table avoids)")
    parser.add_argument("--host-budget", default=None,
                        help="with --disk-path, the pinned host pool's budget (default: unbounded, nothing spills)")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="folder for decode_profile.json")
    args = parser.parse_args(argv)
    if (args.disk_path or args.host_budget) and not args.gpu_budget:
        parser.error("--disk-path and --host-budget add a configuration to --gpu-budget's: give --gpu-budget too")
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_llama("tiny" if args.quick else "llama8b", device, dtype)
    layers = model.config.num_hidden_layers
    context = args.context or (2048 if args.quick else 8192)
    args.steps = args.steps or (4 if args.quick else 32)
    config = ReAttentionConfig.from_file(args.config) if args.config else ReAttentionConfig()
    if args.quick:
        config = config.replace(global_size=16, span_size=16, top_k=8, local_size=256, chunk_size=64)
    args.warmup = (config.span_size or 32) if args.chunk == 1 else 1  # decode: one cycle of the local window's length
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1), generator=generator).to(device)
    kv = record_kv(model, ids[:, :4096])

    def stock_prepare(cache):
        with torch.inference_mode():
            for start in range(0, context, 8192):
                model(input_ids=ids[:, start:min(start + 8192, context)], logits_to_keep=1,
                      **{cache_keyword(model): cache})
        return ids[:, context:]

    def kvtier_prepare(cache):
        fill(cache, kv, context)
        return ids[:, context:]

    rows = [profile_config("stock", model, lambda: DynamicCache(config=model.config), stock_prepare, args, layers)]
    variants = [("kvtier kernels=auto", {"kernels": "auto"}), ("kvtier kernels=reference", {"kernels": "reference"})]
    if args.gpu_budget:
        variants.append((f"kvtier kernels=auto gpu_budget={args.gpu_budget}", {"gpu_budget": args.gpu_budget}))
    if args.gpu_budget and args.disk_path:
        host = f" host_budget={args.host_budget}" if args.host_budget else ""
        variants.append((f"kvtier kernels=auto gpu_budget={args.gpu_budget}{host} + LMDB",
                         {"gpu_budget": args.gpu_budget, "host_budget": args.host_budget, "disk_path": args.disk_path}))
    for name, overrides in variants:
        rows.append(profile_config(name, model, lambda: ReAttentionCache(model, config, **overrides), kvtier_prepare,
                                   args, layers))
    print(f"\n| config | ms per step ({args.chunk} token(s)) | vs stock | kernels / copies per step | GPU busy ms |"
          "\n|---|---|---|---|---|")
    for row in rows:
        counted = row["launches"]
        launch = "" if counted is None else f"{counted['kernels']} / {counted['copies']}"
        busy = "" if counted is None else counted["gpu_busy_ms"]
        print(f"| {row['config']} | {row['ms_median']} | {row['ms_median'] / rows[0]['ms_median']:.2f}x | {launch} | "
              f"{busy} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_profile.json").write_text(
            json.dumps({"context": context, "chunk": args.chunk, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
