"""Pinned host memory: what growing the host tier costs the step that grows it, and whether a background thread
could pay it instead. The host pool (kvtier.tiers.host.HostPool) grows in blocks of BLOCK_BYTES of page-locked memory,
one allocation each, inside the attention call that first needs the room; a 1M-token prefill of the Llama-3.1-8B shape
pins ~109 GiB that way (RESULTS.md section 24d). Measured here: each block's allocation time (and the pinning rate),
then a host-bound loop of small GPU launches (what a prefill forward's host thread does) alone and while another
thread allocates the same blocks. Writes pinning.json and pinning.png into --out; prints the table last.

    python benchmarks/pinning.py --blocks 32 --out $OUT/pinning     # 8 GiB in 256 MiB blocks
    python benchmarks/pinning.py --quick                            # the CPU, plain memory, small blocks (CI)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from kvtier.buffers import buffer
from kvtier.tiers.host import BLOCK_BYTES
from kvtier.tools.args import positive
from kvtier.tools.output import default_out, print_report, write_json
from kvtier.tools.plots import bar_chart

QUICK_BLOCK_BYTES = 4 * 2**20


def allocate_blocks(count: int, nbytes: int, pinned: bool, held: list[torch.Tensor]) -> list[float]:
    """`count` host blocks of `nbytes`, each as the host pool makes one (kept in `held`) -> milliseconds each."""
    spent = []
    for _ in range(count):
        began = time.perf_counter()
        held.append(buffer((nbytes,), torch.uint8, pin_memory=pinned))
        spent.append((time.perf_counter() - began) * 1e3)
    return spent


def release_pinned(held: list[torch.Tensor], pinned: bool) -> None:
    """Drop the blocks and empty PyTorch's pinned-memory cache, so the next pass pins anew (a cached block comes
    back in microseconds: the first version of this script timed the thread's pass on cached blocks)."""
    held.clear()
    if pinned:
        empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or torch._C._host_emptyCache
        empty()


def host_bound_work(steps: int, device: torch.device) -> float:
    """Seconds for `steps` rounds of 16 tiny elementwise launches on `device` (bound by the host queueing them), then
    waiting for the device."""
    x = torch.ones(1024, device=device)
    began = time.perf_counter()
    for _ in range(steps):
        for _ in range(16):
            x = x * 1.0001 + 0.0001
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def measure(blocks: int, nbytes: int, steps: int, device: torch.device) -> dict:
    pinned = device.type == "cuda"
    host_bound_work(steps // 10 + 1, device)  # warm-up: the kernels' first launches
    held: list[torch.Tensor] = []
    block_ms = allocate_blocks(blocks, nbytes, pinned, held)
    release_pinned(held, pinned)
    alone_s = host_bound_work(steps, device)
    beside: list[float] = []
    worker = threading.Thread(target=lambda: beside.extend(allocate_blocks(blocks, nbytes, pinned, held)))
    worker.start()
    concurrent_s = host_bound_work(steps, device)
    worker.join()
    release_pinned(held, pinned)
    total_gib = blocks * nbytes / 2**30
    return {
        "device": torch.cuda.get_device_name(device) if pinned else "cpu", "pinned": pinned, "blocks": blocks,
        "block_bytes": nbytes, "block_ms": [round(ms, 3) for ms in block_ms],
        "block_ms_median": round(statistics.median(block_ms), 3), "block_ms_max": round(max(block_ms), 3),
        "gib_per_s": round(total_gib / (sum(block_ms) / 1e3), 2),
        "work_steps": steps, "work_alone_s": round(alone_s, 4), "work_beside_pinning_s": round(concurrent_s, 4),
        "work_slowdown": round(concurrent_s / alone_s, 3),
        "blocks_in_thread": len(beside), "pinning_in_thread_s": round(sum(beside) / 1e3, 3),
    }


def format_table(result: dict) -> str:
    size = result["block_bytes"] / 2**20
    kind = "pinned" if result["pinned"] else "plain (no CUDA)"
    return "\n".join([
        "| measure | value |", "|---|---|",
        f"| one {size:g} MiB {kind} block, ms (median / max of {result['blocks']}) | "
        f"{result['block_ms_median']} / {result['block_ms_max']} |",
        f"| allocation rate, GiB/s | {result['gib_per_s']} |",
        f"| host-bound launches, s: alone | {result['work_alone_s']} |",
        f"| the same beside the blocks allocated in a thread (that thread: {result['pinning_in_thread_s']} s) | "
        f"{result['work_beside_pinning_s']} ({result['work_slowdown']}x) |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=positive, default=None, help="blocks allocated per pass (default 32; --quick 4)")
    parser.add_argument("--steps", type=positive, default=None,
                        help="rounds of launches in the host-bound loop (default 2000; --quick 50)")
    parser.add_argument("--quick", action="store_true", help="the CPU, plain memory, 4 MiB blocks: checks the script")
    parser.add_argument("--out", type=Path, default=None, help="folder for pinning.json and pinning.png")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    blocks = args.blocks or (4 if args.quick else 32)
    result = measure(blocks, QUICK_BLOCK_BYTES if args.quick else BLOCK_BYTES, args.steps or (50 if args.quick else 2000),
                     device)
    out = args.out or default_out("pinning")
    paths = [write_json(out / "pinning.json", result),
             bar_chart(out / "pinning.png", [f"block {index}" for index in range(blocks)], result["block_ms"],
                       "ms to allocate", f"pinning: {blocks} host blocks of {result['block_bytes'] / 2**20:g} MiB")]
    print_report(paths, format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
