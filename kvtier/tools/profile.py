"""`kvtier profile`: the memory a long context costs when it is held three ways - transformers' DynamicCache ("stock"),
kvtier with every span on the GPU ("kvtier-gpu"), and kvtier with a GPU budget spilling to pinned host memory and an
LMDB file ("kvtier-tiers") - for contexts up to 1M tokens. Per (configuration, context) cell it reports the GPU
(torch's peak and the driver's device-used figure), the process's resident host memory and the LMDB file's bytes on
disk, sampled on a background thread (kvtier.tools.memory) through the prefill (or fill) and decode.

Stock prefills its context for real, in chunks, where the KV fits on the device (and up to --stock-limit: its
prefill is quadratic). kvtier's caches are filled with kvtier.tools.longctx.fill (the pre-RoPE K/V of a short real
prefill, tiled to the context, fed through the cache's own sealing, summaries and placement), then decode.
The report is kvtier.tools.profile_report's."""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvtier.cache import ReAttentionCache
from kvtier.config import ReAttentionConfig
from kvtier.errors import CacheWriteError, TierFullError
from kvtier.policies import build_policy
from kvtier.tools.args import byte_budget, format_length, length, lengths, milliseconds, positive, versions
from kvtier.tools.longctx import fill, record_kv
from kvtier.tools.measure import decode, prefill
from kvtier.tools.memory import (DeviceMemory, MemorySampler, filesystem_of, host_bytes, peak_memory, pool_growth,
                                 release_memory, rss_bytes)
from kvtier.tools.model import load_smollm2, preferred_dtype, random_llama, window_of
from kvtier.tools.output import default_out, print_report
from kvtier.tools.profile_report import (format_cell, format_table, load_reports, merge_reports, write_profile,
                                         write_report)

GiB = 2**30
CONFIGS = ("stock", "kvtier-gpu", "kvtier-tiers")
MODELS = ("llama8b", "smollm2")
SAMPLE_TOKENS = 2048  # tokens of the real prefill whose K/V kvtier's caches are filled with, tiled
FIT_MARGIN = 0.9  # a cell runs when its estimated need is below this fraction of what is free
# Llama-3.1-8B's shape (random weights: memory and time depend on the shape, not on the values).
# option -> (full run, --quick); None in args means "not given"
DEFAULTS = {
    "contexts": ([8 << 10, 32 << 10, 128 << 10, 512 << 10, 1 << 20], [1 << 10, 4 << 10]),
    "gpu_budget": (1 * GiB, 260 << 10),
    "host_budget": (96 * GiB, 512 << 10),
    "decode_steps": (16, 4),
    "interval": (100.0, 20.0),
    "sample_tokens": (SAMPLE_TOKENS, 512),
}


class ProfileError(Exception):
    """Options that cannot be profiled as given; the message says why and what to change."""


# ---- command line ---------------------------------------------------------------------------------------------------
def add_profile_parser(commands) -> argparse.ArgumentParser:
    """Add `kvtier profile` to argparse's subparsers object `commands`."""
    profile = commands.add_parser(
        "profile", help="GPU / host / disk memory of 8K..1M-token contexts: stock vs kvtier vs kvtier with tiers",
        description="Memory of a long context held by transformers' DynamicCache (stock), by kvtier with every "
                    "span on the GPU (kvtier-gpu) and by kvtier with a GPU budget spilling to pinned host memory "
                    "and LMDB (kvtier-tiers): per context, torch's peak GPU allocation, the GPU's device-used "
                    "memory (pynvml), host RSS and LMDB bytes on disk, sampled on a background thread through "
                    "prefill/fill and decode. Stock prefills for real in chunks where its KV fits; kvtier is filled "
                    "with kvtier.tools.longctx.fill (a short prefill's K/V, tiled). Writes profile.json, "
                    "profile-memory.png and profile-timeline.png to --out and prints a table last. The default "
                    "model is Llama-3.1-8B's shape with random weights, built on the GPU; --quick runs a tiny "
                    "random Llama on the CPU in under a minute.")
    profile.add_argument("--model", choices=MODELS, default=None,
                         help="llama8b: Llama-3.1-8B's shape, random bf16 weights, needs a CUDA GPU (default); "
                              "smollm2: SmolLM2-135M-Instruct (see `kvtier demo`)")
    profile.add_argument("--contexts", type=lengths, default=None,
                         help="comma list of context lengths, k = 1024, m = 1024k (default 8k,32k,128k,512k,1m; "
                              "--quick: 1k,4k)")
    profile.add_argument("--configs", type=_configs, default=list(CONFIGS),
                         help=f"comma list of {', '.join(CONFIGS)} (default: all)")
    profile.add_argument("--gpu-budget", type=byte_budget, default=None,
                         help="kvtier-tiers' span pool on the GPU, e.g. 1GiB (default 1GiB; --quick 260KiB): at 1M "
                              "tokens of Llama-8B kvtier also keeps ~6 GiB of span summaries and local windows on "
                              "the GPU, and the goal is weights + 8 GiB")
    profile.add_argument("--host-budget", type=byte_budget, default=None,
                         help="kvtier-tiers' pinned host pool; the rest goes to LMDB (default 96GiB; --quick 512KiB)")
    profile.add_argument("--disk-path", type=Path, default=None,
                         help="folder for kvtier-tiers' LMDB spill file (default: the system's temp folder); a "
                              "private subfolder is made there and removed at the end")
    profile.add_argument("--decode-steps", type=positive, default=None,
                         help="greedy tokens decoded after each context is built (default 16; --quick 4)")
    profile.add_argument("--interval", type=milliseconds, default=None,
                         help="milliseconds between memory samples (default 100; --quick 20)")
    profile.add_argument("--prefill-chunk", type=positive, default=2048,
                         help="tokens per forward of stock's prefill (default 2048)")
    profile.add_argument("--stock-limit", type=length, default=128 << 10,
                         help="largest context stock prefills (default 128k: its prefill is quadratic, 512k is "
                              "estimated at ~6 min on an H200); beyond it the table shows '-' and the JSON the KV it "
                              "would need")
    profile.add_argument("--config", type=Path, default=None,
                         help="a ReAttentionConfig (.yaml/.json) for the kvtier configurations (default: derived from "
                              "the model's window; for the 8B shape see benchmarks/configs/scope-8k.yaml)")
    profile.add_argument("--out", type=Path, default=None, help="output folder (default runs/profile-<timestamp>)")
    profile.add_argument("--quick", action="store_true",
                         help="a tiny random Llama on the CPU, contexts 1k,4k: under a minute (CI)")
    profile.add_argument("--report", nargs="+", type=Path, default=None, metavar="JSON",
                         help="measure nothing: merge earlier runs' profile.json files (e.g. one run per context "
                              "range) into --out's JSON, plots and table")
    profile.set_defaults(run=run_profile)
    return profile


def run_profile(args: argparse.Namespace) -> int:
    try:
        if args.report:
            return _rereport(args)
        return _profile(_settings(args), ["kvtier", *getattr(args, "argv", ["profile"])])
    except ProfileError as err:
        print(f"kvtier profile: error: {err}", file=sys.stderr)
        return 2


@dataclass(frozen=True)
class Settings:
    model: str  # "tiny" (--quick), "llama8b" or "smollm2"
    device: str
    contexts: list[int]
    configs: list[str]
    gpu_budget: int
    host_budget: int
    disk_path: Path | None
    decode_steps: int
    interval_s: float
    prefill_chunk: int
    stock_limit: int
    sample_tokens: int
    out: Path
    config: ReAttentionConfig  # the kvtier configurations' sizes and policy (budgets come from the options)


def _settings(args: argparse.Namespace) -> Settings:
    if args.quick and args.model is not None:
        raise ProfileError("--quick runs its own tiny random model on the CPU; drop --model (or --quick)")
    model = "tiny" if args.quick else args.model or "llama8b"
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if model == "llama8b" and device != "cuda":
        raise ProfileError("--model llama8b (16 GB of bf16 weights) needs a CUDA GPU and none is visible; use "
                           "--quick on a CPU, or --model smollm2")
    given = {name: getattr(args, name, None) for name in DEFAULTS}
    value = {name: given[name] if given[name] is not None else DEFAULTS[name][args.quick] for name in DEFAULTS}
    contexts = sorted(set(value["contexts"]))
    if not contexts:
        raise ProfileError("--contexts is empty; give lengths like 8k,128k,1m")
    return Settings(model=model, device=device, contexts=contexts, configs=args.configs,
                    gpu_budget=value["gpu_budget"], host_budget=value["host_budget"], disk_path=args.disk_path,
                    decode_steps=value["decode_steps"], interval_s=value["interval"] / 1e3,
                    prefill_chunk=args.prefill_chunk, stock_limit=args.stock_limit,
                    sample_tokens=value["sample_tokens"], config=_read_config(args.config),
                    out=args.out or default_out("profile"))


def _read_config(path: Path | None) -> ReAttentionConfig:
    if path is None:
        return ReAttentionConfig()
    try:
        return ReAttentionConfig.from_file(path)
    except ValueError as err:
        raise ProfileError(str(err)) from None


def _configs(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown configuration(s) {unknown or [text]}; choose from "
                                         f"{', '.join(CONFIGS)}")
    return list(dict.fromkeys(names))


# ---- the model and the run ------------------------------------------------------------------------------------------
def load_model(name: str, device: str):
    """The model to profile, in eval mode on `device`."""
    if name == "smollm2":
        return load_smollm2(preferred_dtype(device), device)[0]
    return random_llama(name, device, torch.float32 if name == "tiny" else torch.bfloat16)


@dataclass
class Run:
    """What every cell of one profile shares."""

    model: Any
    settings: Settings
    spill: Path  # kvtier-tiers' disk_path: a private folder, removed at the end
    sample_kv: list  # per layer the pre-RoPE (keys, values) [1, Hkv, T, D] of the sample prefill, on the CPU
    kvtier: ReAttentionConfig  # the cache config resolved for the model's window (what every kvtier cell uses)
    attention: str  # the model's own attention implementation (a ReAttentionCache switches it to kvtier's)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def shape(self) -> dict[str, int]:
        config = self.model.config
        heads = config.num_attention_heads
        return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": heads,
                "kv_heads": config.num_key_value_heads, "intermediate": config.intermediate_size,
                "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
                "vocab": config.vocab_size, "window": window_of(self.model)}

    def kv_bytes(self, tokens: int) -> int:
        """K and V of every layer for `tokens` tokens, as a DynamicCache holds them."""
        shape = self.shape
        return 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * self.model.dtype.itemsize * tokens

    def budgets(self, config: str) -> dict[str, Any]:
        if config == "kvtier-gpu":
            return {}
        return {"gpu_budget": self.settings.gpu_budget, "host_budget": self.settings.host_budget,
                "disk_path": str(self.spill)}

    def needs(self, config: str, context: int) -> dict[str, int]:
        """Bytes a cell will need on the model's device, in host memory and on disk, estimated from above so that a
        cell that cannot fit is skipped rather than run out of memory."""
        shape, itemsize, kv = self.shape, self.model.dtype.itemsize, self.kv_bytes(context)
        if config == "stock":
            chunk = self.settings.prefill_chunk  # one chunk's activations and the [chunk, context] mask / scores
            acts = chunk * (context + 3 * shape["intermediate"] + 8 * shape["hidden"]) * 4
            return {"device": kv + kv // shape["layers"] + acts, "host": 0, "disk": 0}
        cfg = self.kvtier
        span_bytes = self.kv_bytes(cfg.span_size) // shape["layers"]
        spans = shape["layers"] * -(-context // cfg.span_size)
        summary = build_policy(cfg.policy, cfg.policy_options).summary_size(cfg.span_size)
        fixed = (2 * self.kv_bytes(cfg.local_size + cfg.chunk_size)  # local windows with their growth slack
                 + shape["layers"] * pool_growth(spans // shape["layers"]).slots * shape["kv_heads"] * summary
                 * shape["head_dim"] * itemsize  # summaries, a doubling table per layer
                 + 4 * cfg.scope_bound * shape["heads"] * shape["head_dim"] * itemsize  # one layer's scope
                 + self.kv_bytes(self.settings.sample_tokens))  # the sample, during the fill
        if config == "kvtier-gpu":  # growing copies the pool: old and new allocation at once
            return {"device": fixed + pool_growth(spans).peak * span_bytes, "host": 0, "disk": 0}
        gpu, host = self.settings.gpu_budget, self.settings.host_budget
        pool = pool_growth(spans, gpu // span_bytes).peak * span_bytes
        return {"device": fixed + pool, "host": min(host, max(kv - gpu, 0)), "disk": max(kv - gpu - host, 0) * 21 // 20}

    def skip_reason(self, config: str, context: int, needs: dict[str, int]) -> str | None:
        if config == "stock" and context > self.settings.stock_limit:
            return (f"beyond --stock-limit {format_length(self.settings.stock_limit)} (stock's prefill is "
                    f"quadratic); it would need ~{needs['device'] / GiB:.1f} GiB on the device, "
                    f"{self.kv_bytes(context) / GiB:.1f} GiB of it KV")
        free = {"host": host_bytes("MemAvailable"), "disk": shutil.disk_usage(self.spill).free}
        needs = dict(needs)
        if self.device.type == "cuda":
            free["device"] = torch.cuda.mem_get_info(self.device)[0]
        else:  # the model's device is host memory too
            needs["host"] += needs.pop("device")
        if filesystem_of(self.spill) in ("tmpfs", "ramfs"):  # a --disk-path in RAM: the LMDB file takes host memory
            needs["host"] += needs["disk"]
        for where, need in needs.items():
            if free.get(where) is not None and need > FIT_MARGIN * free[where]:
                return f"needs ~{need / GiB:.1f} GiB of {where} memory, {free[where] / GiB:.1f} GiB free"
        return None


# ---- measuring ------------------------------------------------------------------------------------------------------
def _profile(settings: Settings, command: list[str]) -> int:
    doc, paths = _measure(settings, command)
    print_report(paths, format_table(doc))
    return 0


def _measure(settings: Settings, command: list[str]) -> tuple[dict[str, Any], list[Path]]:
    """Every cell -> (the report's dict, the files written)."""
    settings.out.mkdir(parents=True, exist_ok=True)
    if settings.disk_path is not None:
        settings.disk_path.mkdir(parents=True, exist_ok=True)
    try:
        spill = Path(tempfile.mkdtemp(prefix="kvtier-profile-", dir=settings.disk_path))
    except OSError as err:
        raise ProfileError(f"--disk-path {settings.disk_path}: cannot make a folder there ({err})") from None
    try:
        began, started = time.perf_counter(), datetime.now()
        idle = _idle_device(settings.device)
        model = load_model(settings.model, settings.device)
        attention = model.config._attn_implementation
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, settings.sample_tokens), generator=generator)  # [1, T]
        sample = [(k.cpu(), v.cpu()) for k, v in record_kv(model, ids.to(model.device))]
        run = Run(model, settings, spill, sample, settings.config.resolve(window_of(model)), attention)
        _check_budgets(run)
        print(f"{settings.model} on {settings.device} ready in {time.perf_counter() - began:.1f} s", file=sys.stderr)
        doc = {"meta": _meta(run, command, idle, started), "cells": [], "timelines": []}
        cells = [(config, context) for context in settings.contexts for config in settings.configs]
        for config, context in tqdm(cells, desc="profile", unit="cell"):
            cell, timeline = run_cell(run, config, context)
            doc["cells"].append(cell)
            if timeline is not None:
                doc["timelines"].append({"config": config, "context": context, **timeline})
            tqdm.write(format_cell(cell), file=sys.stderr)
            write_profile(doc, settings.out)  # after every cell: a run cut short keeps what it measured
        doc["meta"]["finished"] = datetime.now().isoformat(timespec="seconds")
        doc["meta"]["wall_s"] = round(time.perf_counter() - began, 1)
        return doc, write_report(doc, settings.out)
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _rereport(args: argparse.Namespace) -> int:
    try:
        doc = merge_reports(load_reports(args.report))
    except ValueError as err:
        raise ProfileError(str(err)) from None
    out = args.out or default_out("profile")
    out.mkdir(parents=True, exist_ok=True)
    print_report(write_report(doc, out), format_table(doc))
    return 0


def _idle_device(device: str) -> dict[str, int | None]:
    """The GPU before the model exists: its total memory and what is in use (our CUDA context, other processes)."""
    if device != "cuda":
        return {"total": None, "used": None}
    torch.cuda.mem_get_info()  # creates this process's CUDA context
    probe = DeviceMemory(torch.device("cuda"))
    try:
        return {"total": probe.total(), "used": probe.used()}
    finally:
        probe.close()


def _check_budgets(run: Run) -> None:
    """Fail before the first cell when --gpu-budget / --host-budget cannot hold one attention step's spans."""
    if "kvtier-tiers" not in run.settings.configs:
        return
    probe = ReAttentionCache(run.model, **run.budgets("kvtier-tiers"))
    try:
        fill(probe, [(k[:, :, :1].to(run.device), v[:, :, :1].to(run.device)) for k, v in run.sample_kv], 1)
    except TierFullError as err:
        raise ProfileError(f"--gpu-budget / --host-budget too small for this model: {err}") from None
    finally:
        probe.close()


def run_cell(run: Run, config: str, context: int) -> tuple[dict[str, Any], dict[str, list] | None]:
    """Measure one configuration at one context -> (the cell's figures, its sampled timeline or None if skipped)."""
    needs = run.needs(config, context)
    cell = {"config": config, "context": context, "kv_bytes": run.kv_bytes(context), "needs": needs,
            "budgets": run.budgets(config) if config != "stock" else None}
    reason = run.skip_reason(config, context, needs)
    if reason is not None:
        return {**cell, "status": "skipped", "reason": reason}, None
    release_memory(run.device)
    cell["rss_start"] = rss_bytes()
    measure = _stock if config == "stock" else _kvtier
    with MemorySampler(run.settings.interval_s, run.spill if config == "kvtier-tiers" else None, run.device) as sampler:
        try:
            cell.update(measure(run, config, context, sampler), status="ok", reason=None)
        except (torch.OutOfMemoryError, TierFullError, CacheWriteError) as err:
            cell.update(status="failed", reason=f"{type(err).__name__}: {str(err).splitlines()[0]}")
        release_memory(run.device)
        sampler.phase("released")
    timeline = sampler.columns()
    # torch's peak is exact (the allocator's, per phase); the others are the largest sample.
    peaks = {"torch_peak": timeline["torch_peak"] + [cell.get("torch_peak_build"), cell.get("torch_peak_decode")],
             "device_used_peak": timeline["device_used"], "rss_peak": timeline["rss"], "lmdb_peak": timeline["disk"]}
    for field, values in peaks.items():
        values = [value for value in values if value is not None]
        cell[field] = max(values) if values else None
    return cell, timeline


def _stock(run: Run, config: str, context: int, sampler: MemorySampler) -> dict[str, Any]:
    model, chunk = run.model, run.settings.prefill_chunk
    model.set_attn_implementation(run.attention)  # stock attention (kvtier's next cache switches it back)
    cache = DynamicCache(config=model.config)
    generator = torch.Generator().manual_seed(context)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator).to(model.device)  # [1, T]
    sampler.phase("prefill")
    build_s = prefill(model, cache, ids, chunk, f"stock prefill {format_length(context)}")
    figures = {"build": f"prefill, {chunk}-token chunks of random ids", "build_s": build_s,
               "torch_peak_build": peak_memory(run.device, reset=True)}
    return {**figures, **_decode(run, cache, context, sampler), "kvtier": None}


def _kvtier(run: Run, config: str, context: int, sampler: MemorySampler) -> dict[str, Any]:
    kv = [(k.to(run.device), v.to(run.device)) for k, v in run.sample_kv]  # [1, Hkv, T, D] per layer
    cache = ReAttentionCache(run.model, **run.budgets(config))
    try:
        sampler.phase("fill")
        build_s = fill(cache, kv, context)
        del kv
        figures = {"build": f"kvtier.tools.longctx.fill: a {run.settings.sample_tokens}-token prefill's K/V, tiled",
                   "build_s": build_s, "torch_peak_build": peak_memory(run.device, reset=True)}
        figures.update(_decode(run, cache, context, sampler))
        stats = cache.stats()
    finally:
        cache.close()
    kept = ("span_bytes", "spans", "bytes", "gpu_fixed_bytes", "moved")
    return {**figures, "kvtier": {name: stats[name] for name in kept}}


def _decode(run: Run, cache, context: int, sampler: MemorySampler) -> dict[str, Any]:
    """Greedy steps from a random token into the filled `cache` -> decode figures (the cache still holds it all)."""
    model = run.model
    sampler.phase("decode")
    token = torch.randint(0, model.config.vocab_size, (1, 1), device=model.device)  # [1, 1]
    times, _ = decode(model, cache, token, run.settings.decode_steps, desc=f"decode {format_length(context)}")
    cuda = run.device.type == "cuda"
    return {"decode_ms": statistics.median(times), "torch_peak_decode": peak_memory(run.device, reset=True),
            "torch_end": torch.cuda.memory_allocated(run.device) if cuda else None}


def _meta(run: Run, command: list[str], idle: dict[str, int | None], started: datetime) -> dict[str, Any]:
    settings, model = run.settings, run.model
    cuda = run.device.type == "cuda"
    return {
        "command": command,
        "model": {"tiny": "tiny random Llama (--quick)", "smollm2": "SmolLM2-135M-Instruct",
                  "llama8b": "Llama-3.1-8B shape, random weights"}[settings.model],
        "shape": run.shape,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(run.device) if cuda else "cpu",
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "kv_bytes_per_token": run.kv_bytes(1),
        "kvtier_config": {name: getattr(run.kvtier, name) for name in
                          ("global_size", "local_size", "span_size", "top_k", "chunk_size", "policy")},
        "contexts": settings.contexts,
        "configs": settings.configs,
        "gpu_budget": settings.gpu_budget,
        "host_budget": settings.host_budget,
        "disk_path": str(run.spill.parent),
        "decode_steps": settings.decode_steps,
        "interval_s": settings.interval_s,
        "prefill_chunk": settings.prefill_chunk,
        "stock_limit": settings.stock_limit,
        "sample_tokens": settings.sample_tokens,
        "device_total_bytes": idle["total"],
        "device_used_idle_bytes": idle["used"],
        "host_total_bytes": host_bytes("MemTotal"),
        "disk_free_bytes": shutil.disk_usage(run.spill).free,
        "disk_filesystem": filesystem_of(run.spill),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "started": started.isoformat(timespec="seconds"),
    }
