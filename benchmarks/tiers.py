"""Tier benchmark: one long context held GPU-only, spilled to pinned host memory, and spilled through the host to
LMDB. Reports decode ms/token, peak GPU memory, bytes moved per decoded token in each direction, and the host->GPU
bandwidth the spill path achieves against a pinned-copy ceiling measured in the same run.

The context is real K/V tiled: the model prefills `--sample` tokens of haystack text once (its pre-RoPE K/V are
recorded), and that K/V is fed into every cache's layers (their own sealing, summaries and placement) until each holds
`--context` tokens. The model's own chunked prefill to 1M tokens would cost O(N^2 / S) selections, hours on the
PyTorch reference path; the decode steps measured afterwards run the real model. Writes tiers.json and tiers.png
(decode ms/token, and where the spans live) into --out; prints the table last.

    python benchmarks/tiers.py --context 1M --gpu-budget 1GiB --host-budget 4GiB --disk-path /tmp/kvtier-spill
    python benchmarks/tiers.py --quick      # a tiny random model on the CPU, under a minute
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kvtier import ReAttentionCache
from kvtier.tools.args import byte_budget, length, positive
from kvtier.tools.bench import measure_ceilings
from kvtier.tools.haystack import build_sample, draw_key
from kvtier.tools.longctx import fill, record_kv
from kvtier.tools.measure import decode, sync
from kvtier.tools.memory import peak_memory, release_memory
from kvtier.tools.model import load_smollm2, preferred_dtype, random_llama
from kvtier.tools.output import default_out, print_report, unwind_on_sigterm, write_json
from kvtier.tools.plots import pyplot, save_figure

GiB = 2**30


def load_model(quick: bool, device: str):
    if quick:
        model = random_llama("tiny", device, torch.float32)
        return model, torch.randint(0, model.config.vocab_size, (1, 1024)).to(device)
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


def _gib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / GiB


def run_config(name: str, model, kv, context: int, budgets: dict, steps: int, warmup: int) -> dict:
    release_memory(model.device)
    cache = ReAttentionCache(model, **budgets)
    fill_s = fill(cache, kv, context)
    peak_fill = peak_memory(model.device, reset=True)
    before = cache.stats()
    token = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    times, _ = decode(model, cache, token, steps, warmup, desc=f"{name}: decode")
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
        "peak_gpu_gib_fill": _gib(peak_fill),
        "peak_gpu_gib_decode": _gib(peak_memory(model.device)),
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


def plot(rows: list[dict], path: Path) -> Path:
    plt = pyplot()
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
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=length, default=1 << 20, help="tokens of context per cache (default 1M)")
    parser.add_argument("--steps", type=positive, default=32, help="decode steps measured (default 32)")
    parser.add_argument("--warmup", type=int, default=4,
                        help="decode steps before measuring (default 4; the scope length cycles through span_size "
                             "values, so span_size warm-up steps reach every attention shape once)")
    parser.add_argument("--gpu-budget", type=byte_budget, default=GiB,
                        help="GPU budget of the spilling runs (default 1GiB; --quick 512KiB)")
    parser.add_argument("--host-budget", type=byte_budget, default=4 * GiB,
                        help="host budget of the run that spills to LMDB (default 4GiB; --quick 1MiB)")
    parser.add_argument("--disk-path", default=None, help="folder for the LMDB spill file (default: in --out)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for tiers.json and tiers.png (default runs/tiers-<timestamp>)")
    parser.add_argument("--order", default="gpu-only,host,host+disk",
                        help="which configurations run, in this order (default gpu-only,host,host+disk)")
    parser.add_argument("--kernels", choices=("auto", "reference"), default="auto",
                        help="Triton kernels on CUDA (auto) or the PyTorch references (default auto)")
    parser.add_argument("--quick", action="store_true", help="tiny random model on the CPU, 8K context (CI)")
    args = parser.parse_args(argv)
    unwind_on_sigterm()  # stopped by `timeout` or a scheduler, the run unwinds: no spill file stays behind
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    out = args.out or default_out("tiers")
    context = 8 << 10 if args.quick else args.context
    spill = Path(args.disk_path) if args.disk_path else out / "spill"
    gpu_budget, host_budget = (512 << 10, 1 << 20) if args.quick else (args.gpu_budget, args.host_budget)
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
    try:
        for name in tqdm(order, desc="tiers", unit="configuration"):
            budgets = dict(known[name], kernels=args.kernels)
            rows.append(run_config(name, model, kv, context, budgets, 8 if args.quick else args.steps, args.warmup))
            tqdm.write(f"{name}: {rows[-1]['decode_ms_median']:.1f} ms/token", file=sys.stderr)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "pinned_h2d_gbps": ceiling, "argv": sys.argv[1:]}
    print_report([write_json(out / "tiers.json", {"meta": meta, "rows": rows}), plot(rows, out / "tiers.png")],
                 format_table(rows, ceiling))
    return 0


if __name__ == "__main__":
    sys.exit(main())
