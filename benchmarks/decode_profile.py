"""Where a decode step's time goes: stock DynamicCache against ReAttentionCache (Triton kernels and PyTorch
references) at one context, on the Llama-3.1-8B shape with random weights, on SmolLM2-135M-Instruct (--model smollm2) or
on a tiny Llama (--quick).

Prints, per configuration: ms per step (median of --steps after a warm-up of one span cycle), GPU kernels and
copies launched per step and the time the GPU spent in them (CUDA profiler: a step far longer than its GPU time is
bound by the host), the host time of the step's Python frames (cProfile, top --top by own time), and the same per
layer, and kvtier's scope attention by step (ingest and sealing, selection, gather with rotary, attention): the
host's and the device's time per query chunk and layer. A step is one decoded token, or with --chunk N one prefill
forward of N new tokens at the context's depth.
kvtier's context is filled with recorded K/V (kvtier.tools.longctx); stock's is a real chunked prefill. Writes
decode_profile.json and decode_profile.png (ms per step by configuration) into --out; prints the table last.

    python benchmarks/decode_profile.py --context 8k --config benchmarks/configs/scope-8k.yaml --out $OUT/decode
    python benchmarks/decode_profile.py --context 128k --chunk 8192 --steps 4 ...   # a prefill forward instead
    python benchmarks/decode_profile.py --quick      # tiny shapes on the CPU: checks the script
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvtier.cache import ReAttentionCache
from kvtier.config import ReAttentionConfig
from kvtier.tools.args import byte_budget, format_bytes, length, positive
from kvtier.tools.longctx import fill, record_kv
from kvtier.tools.measure import decode, launches, prefill, step, sync
from kvtier.tools.memory import release_memory
from kvtier.tools.model import load_smollm2, random_llama
from kvtier.tools.output import default_out, print_report, unwind_on_sigterm, write_json
from kvtier.tools.plots import bar_chart


class Inputs:
    """What each step feeds: the previous step's token (decode), or --chunk fresh random ids [1, chunk]."""

    def __init__(self, chunk: int, vocab: int, device: str):
        self.chunk, self.vocab, self.device = chunk, vocab, device
        self.generator = torch.Generator().manual_seed(1)

    def next(self, token: torch.Tensor) -> torch.Tensor:
        if self.chunk == 1:
            return token
        return torch.randint(0, self.vocab, (1, self.chunk), generator=self.generator).to(self.device)


def host_profile(model, cache, token: torch.Tensor, steps: int, top: int, inputs: Inputs) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    with torch.inference_mode():
        for _ in range(steps):  # not kvtier.tools.measure.decode: a sync per step would show as host time here
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
    times, token = decode(model, cache, token, args.steps, args.warmup, feed=inputs.next, desc=f"{name}: steps")
    counted = launches(model, cache, inputs.next(token), by_name=True)  # on a CPU: no kernels, the phases' host time
    report = host_profile(model, cache, token, args.profile_steps, args.top, inputs)
    median = statistics.median(times)
    row = {"config": name, "ms_median": round(median, 3), "ms_min": round(min(times), 3),
           "ms_per_layer": round(median / layers, 4), "launches": counted}
    busy = f", GPU busy {counted['gpu_busy_ms']:.2f} ms" if torch.cuda.is_available() else ""
    tqdm.write(f"\n=== {name}: {median:.2f} ms per step of {args.chunk} token(s) (min {min(times):.2f}), "
               f"{median / layers:.3f} ms per layer{busy}; "
               f"launches {(counted['kernels'], counted['copies'])}")
    for kernel, count in list(counted["by_name"].items())[:25]:
        tqdm.write(f"  {count:5d}  {kernel}")
    for phase, spent in counted["phases"].items():  # per query chunk and layer
        ranges = max(spent["ranges"], 1)
        tqdm.write(f"  {phase}: {spent['ranges']:g} chunk-layers, per chunk-layer host "
                   f"{spent['host_ms'] / ranges:.3f} ms, device {spent['device_ms'] / ranges:.3f} ms")
    tqdm.write(report)
    del cache
    release_memory(model.device)
    return row


CONFIGS = ("stock", "auto", "reference", "host", "disk")


def _configs(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown configuration(s) {unknown or text!r}: choose from {','.join(CONFIGS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=length, default=None, help="context tokens (default 8k; --quick 2k)")
    parser.add_argument("--model", choices=("llama8b", "smollm2"), default="llama8b",
                        help="llama8b: the Llama-3.1-8B shape, random weights; smollm2: SmolLM2-135M-Instruct (default "
                             "llama8b; --quick: a tiny random Llama)")
    parser.add_argument("--config", type=Path, default=None, help="a ReAttentionConfig .yaml/.json for kvtier")
    parser.add_argument("--steps", type=positive, default=None, help="timed steps (default 32; --quick 4)")
    parser.add_argument("--chunk", type=length, default=1,
                        help="new tokens per step: 1 = a decode step (default); e.g. 8k = one prefill forward at the "
                             "context's depth (the context grows by this much per step)")
    parser.add_argument("--profile-steps", type=positive, default=8, help="decode steps under cProfile (default 8)")
    parser.add_argument("--top", type=positive, default=30,
                        help="cProfile rows printed per configuration (default 30)")
    parser.add_argument("--gpu-budget", type=byte_budget, default=None,
                        help="also profile kvtier (kernels=auto) with this gpu_budget, the rest in pinned host memory")
    parser.add_argument("--disk-path", default=None,
                        help="with --gpu-budget, also profile it with an LMDB tier in this folder (the CPU then learns "
                             "each layer's selection before its gather: the path the device table avoids)")
    parser.add_argument("--host-budget", type=byte_budget, default=None,
                        help="with --disk-path, the pinned host pool's budget (default: unbounded, nothing spills)")
    parser.add_argument("--configs", type=_configs, default=list(CONFIGS),
                        help=f"which configurations, comma-separated, of {','.join(CONFIGS)} (default all; host and "
                             "disk need --gpu-budget, disk --disk-path: e.g. --configs host at a context only the "
                             "host tier holds)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random Llama on the CPU, a 2k context: checks the script in seconds (CI)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for decode_profile.json and decode_profile.png (default "
                             "runs/decode_profile-<timestamp>)")
    args = parser.parse_args(argv)
    unwind_on_sigterm()  # stopped by `timeout` or a scheduler, the run unwinds: no spill file stays behind
    if (args.disk_path or args.host_budget) and not args.gpu_budget:
        parser.error("--disk-path and --host-budget add a configuration to --gpu-budget's: give --gpu-budget too")
    if ("host" in args.configs and not args.gpu_budget) or ("disk" in args.configs and not args.disk_path):
        if args.configs != list(CONFIGS):
            parser.error("--configs host needs --gpu-budget, and disk needs --disk-path too")
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.model == "smollm2" and not args.quick:
        model, _ = load_smollm2(dtype=dtype, device=device)
    else:
        model = random_llama("tiny" if args.quick else args.model, device, dtype)
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
        prefill(model, cache, ids[:, :context], 8192, "stock prefill")
        return ids[:, context:]

    def kvtier_prepare(cache):
        fill(cache, kv, context)
        return ids[:, context:]

    configurations = []
    if "stock" in args.configs:
        configurations.append(("stock", lambda: DynamicCache(config=model.config), stock_prepare))
    variants = [("auto", "kvtier kernels=auto", {"kernels": "auto"}),
                ("reference", "kvtier kernels=reference", {"kernels": "reference"})]
    gpu = f"gpu_budget={format_bytes(args.gpu_budget)}"
    if args.gpu_budget:
        variants.append(("host", f"kvtier kernels=auto {gpu}", {"gpu_budget": args.gpu_budget}))
    if args.gpu_budget and args.disk_path:
        host = f" host_budget={format_bytes(args.host_budget)}" if args.host_budget else ""
        variants.append(("disk", f"kvtier kernels=auto {gpu}{host} + LMDB",
                         {"gpu_budget": args.gpu_budget, "host_budget": args.host_budget, "disk_path": args.disk_path}))
    configurations += [(name, lambda overrides=overrides: ReAttentionCache(model, config, **overrides), kvtier_prepare)
                       for key, name, overrides in variants if key in args.configs]
    rows = [profile_config(name, model, make_cache, prepare, args, layers)
            for name, make_cache, prepare in tqdm(configurations, desc="decode_profile", unit="configuration")]
    out = args.out or default_out("decode_profile")
    paths = [write_json(out / "decode_profile.json", {"context": context, "chunk": args.chunk, "rows": rows}),
             bar_chart(out / "decode_profile.png", [row["config"] for row in rows], [row["ms_median"] for row in rows],
                       f"ms per step of {args.chunk} token(s), median",
                       f"decode_profile: one step at {context:,} tokens of context")]
    print_report(paths, format_table(rows, args.chunk))
    return 0


def format_table(rows: list[dict], chunk: int) -> str:
    lines = [f"| config | ms per step ({chunk} token(s)) | vs stock | kernels / copies per step | GPU busy ms |",
             "|---|---|---|---|---|"]
    for row in rows:
        counted = row["launches"]
        launch = f"{counted['kernels']} / {counted['copies']}"
        busy = counted["gpu_busy_ms"]
        ratio = f"{row['ms_median'] / rows[0]['ms_median']:.2f}x" if rows[0]["config"] == "stock" else "-"
        lines.append(f"| {row['config']} | {row['ms_median']} | {ratio} | "
                     f"{launch} | {busy} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
