"""Tier benchmark: one long context held GPU-only, spilled to pinned host memory, and spilled through the host to
LMDB. Reports decode ms/token, peak GPU memory, bytes moved per decoded token in each direction, and the host->GPU
bandwidth the spill path achieves against a pinned-copy ceiling measured in the same run.

The context is real K/V tiled: the model prefills `--sample` tokens of haystack text once (its pre-RoPE K/V are
recorded), and that K/V is fed into every cache's layers (their own sealing, summaries and placement) until each holds
`--context` tokens. The model's own chunked prefill to 1M tokens would cost O(N^2 / S) selections, hours on the
PyTorch reference path; the decode steps measured afterwards run the real model.

    python benchmarks/tiers.py --context 1M --gpu-budget 1GiB --host-budget 4GiB --disk-path /tmp/kvtier-spill
    python benchmarks/tiers.py --quick      # a tiny random model on the CPU, under a minute
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvtier import ReAttentionCache
from kvtier.tools.bench import measure_ceilings
from kvtier.config import parse_bytes
from kvtier.tools.longctx import decode, fill, record_kv, sync

GiB = 2**30


def parse_tokens(text: str) -> int:
    """'1M' / '128K' / '4096' -> tokens (powers of two: 1K = 1024)."""
    units = {"k": 2**10, "m": 2**20}
    text = text.strip().lower()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def load_model(quick: bool, device: str):
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048)
        model = LlamaForCausalLM(config).to(device).eval()
        return model, torch.randint(0, 256, (1, 1024)).to(device)
    from kvtier.tools.haystack import build_sample, draw_key
    from kvtier.tools.model import load_smollm2, preferred_dtype

    model, tokenizer = load_smollm2(preferred_dtype(device), device)
    sample = build_sample(tokenizer, 4096, 0.5, draw_key(0, "tiers"))
    return model, torch.tensor([sample.ids], device=device)


def fetch_bandwidth(cache, tier_code: int, spans: int) -> float | None:
    """GB/s of one batched fetch of `spans` spans that now live in tier `tier_code` (1 host, 2 disk) to the GPU -
    the path a decode step takes for its misses; None when that tier holds too few."""
    placement = cache.placement
    live = placement.tier.data[: placement.uids]
    uids = np.flatnonzero(live == tier_code)
    if len(uids) < spans:
        return None
    chosen = np.sort(np.random.default_rng(0).choice(uids, spans, replace=False))
    sync()
    began = time.perf_counter()
    with torch.inference_mode():
        placement.fetch(chosen)
    sync()
    return spans * placement.span_bytes / (time.perf_counter() - began) / 1e9


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / GiB if torch.cuda.is_available() else None


def run_config(name: str, model, kv, context: int, budgets: dict, steps: int, warmup: int) -> dict:
    gc.collect()
    cache = ReAttentionCache(model, **budgets)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    fill_s = fill(cache, kv, context)
    peak_fill = _peak_gib()
    before = cache.stats()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    token = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    times = decode(model, cache, token, steps, warmup)
    after = cache.stats()
    decoded = steps + warmup
    moved = {direction: (after["moved"][direction] - before["moved"][direction]) / decoded for direction in after["moved"]}
    row = {
        "config": name,
        "budgets": budgets,
        "context": after["tokens"],
        "fill_s": fill_s,
        "decode_ms_median": statistics.median(times),
        "decode_ms_p90": sorted(times)[int(0.9 * (len(times) - 1))],
        "peak_gpu_gib_fill": peak_fill,
        "peak_gpu_gib_decode": _peak_gib(),
        "bytes_moved_per_token": moved,
        "spans": after["spans"],
        "resident_bytes": after["bytes"],
        "tiers": after["tiers"],
    }
    step_spans = len(cache.layers) * cache.config.top_k  # what one decode step selects over all layers
    row["fetch_gbps"] = {"host": fetch_bandwidth(cache, 1, step_spans), "disk": fetch_bandwidth(cache, 2, step_spans)}
    row["fetch_spans"] = step_spans
    cache.close()
    return row


def format_table(rows: list[dict], ceiling: float | None) -> str:
    base = next((row for row in rows if row["config"] == "gpu-only"), rows[0])["decode_ms_median"]
    lines = ["| config | context | decode ms/token | vs gpu-only (or first) | peak GPU GiB (decode) | host->GPU MB/token "
             "| GPU->host MB/token | disk->host MB/token | one step's spans from host: GB/s | from disk: GB/s |",
             "|---" * 10 + "|"]
    for row in rows:
        moved = {direction: f"{value / 1e6:.2f}" for direction, value in row["bytes_moved_per_token"].items()}
        fetch = row["fetch_gbps"]
        host = "-" if fetch["host"] is None else f"{fetch['host']:.1f}" + (f" ({100 * fetch['host'] / ceiling:.0f}% of {ceiling:.0f})" if ceiling else "")
        disk = "-" if fetch["disk"] is None else f"{fetch['disk']:.2f}"
        peak = row["peak_gpu_gib_decode"]
        lines.append(
            f"| {row['config']} | {row['context']:,} | {row['decode_ms_median']:.1f} | {row['decode_ms_median'] / base:.2f}x "
            f"| {'-' if peak is None else f'{peak:.2f}'} | {moved['host->gpu']} | {moved['gpu->host']} | {moved['disk->host']} "
            f"| {host} | {disk} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["config"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.bar(names, [row["decode_ms_median"] for row in rows], color="#4477aa")
    left.set_ylabel("decode ms / token (median)")
    resident = {tier: [row["resident_bytes"][tier] / GiB for row in rows] for tier in ("gpu", "host", "disk")}
    bottom = [0.0] * len(rows)
    for tier, color in (("gpu", "#228833"), ("host", "#ccbb44"), ("disk", "#aa3377")):
        right.bar(names, resident[tier], bottom=bottom, label=f"spans on {tier}", color=color)
        bottom = [b + v for b, v in zip(bottom, resident[tier])]
    right.set_ylabel("GiB of span K/V")
    right.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['context']:,}-token context: where the spans live, and what decoding costs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", default="1M", help="tokens of context per cache (default 1M)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps measured (default 32)")
    parser.add_argument("--warmup", type=int, default=4,
                        help="decode steps before measuring (default 4; the scope length cycles through span_size "
                             "values, so span_size warm-up steps reach every attention shape once)")
    parser.add_argument("--gpu-budget", default="1GiB", help="GPU budget of the spilling runs")
    parser.add_argument("--host-budget", default="4GiB", help="host budget of the run that spills to LMDB")
    parser.add_argument("--disk-path", default=None, help="folder for the LMDB spill file (default: next to --out)")
    parser.add_argument("--out", default="benchmarks/results/tiers", help="folder for tiers.json and tiers.png")
    parser.add_argument("--order", default="gpu-only,host,host+disk",
                        help="which configurations run, in this order (default gpu-only,host,host+disk)")
    parser.add_argument("--kernels", choices=("auto", "reference"), default="auto",
                        help="Triton kernels on CUDA (auto) or the PyTorch references (default auto)")
    parser.add_argument("--quick", action="store_true", help="tiny random model on the CPU, 8K context (CI)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    context = parse_tokens("8K" if args.quick else args.context)
    spill = Path(args.disk_path) if args.disk_path else out / "spill"
    gpu_budget, host_budget = ("512KiB", "1MiB") if args.quick else (args.gpu_budget, args.host_budget)
    parse_bytes(gpu_budget, "--gpu-budget"), parse_bytes(host_budget, "--host-budget")
    model, ids = load_model(args.quick, device)
    kv = record_kv(model, ids)
    known = {
        "gpu-only": {},
        "host": {"gpu_budget": gpu_budget},
        "host+disk": {"gpu_budget": gpu_budget, "host_budget": host_budget, "disk_path": str(spill)},
    }
    order = args.order.split(",")
    if not order or set(order) - set(known):
        parser.error(f"--order takes a comma list of {', '.join(known)}; got {args.order!r}")
    ceilings = measure_ceilings(torch.device(device))
    ceiling = ceilings["pinned_h2d_gbps"] if ceilings else None
    rows = []
    for name in order:
        budgets = dict(known[name], kernels=args.kernels)
        rows.append(run_config(name, model, kv, context, budgets, 8 if args.quick else args.steps, args.warmup))
        print(f"{name}: {rows[-1]['decode_ms_median']:.1f} ms/token", file=sys.stderr)
    shutil.rmtree(spill, ignore_errors=True)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "pinned_h2d_gbps": ceiling, "argv": sys.argv[1:]}
    (out / "tiers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, out / "tiers.png")
    print(format_table(rows, ceiling))
    return 0


if __name__ == "__main__":
    sys.exit(main())
