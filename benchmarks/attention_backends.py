"""Scope attention backends: one `_attend` call (kvtier.attention: a query chunk or a decode step attending to its
scope, queries aligned bottom-right) through FlashAttention and through SDPA with the bottom-right mask, on the scope
shapes of SmolLM2-135M and Llama-3.1-8B (random bf16 inputs), with each backend's largest difference from SDPA and
which one attention_backend="auto" runs.
Timings: triton.testing.do_bench medians on CUDA (warm-up first, L2 flushed between calls); on the CPU the median of
a few timed calls after a warm-up call. SDPA's mask is built once per shape, as a forward's layers share it. Writes
attention_backends.json into --out; prints the table last.

    python benchmarks/attention_backends.py --out benchmarks/results/attention-backends-h200
    python benchmarks/attention_backends.py --quick     # tiny shapes on the CPU, SDPA only: checks the script
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvtier.attention import _attend
from kvtier.flash import choose_flash, installed
from kvtier.tools.output import default_out, print_report, unwind_on_sigterm, write_json


@dataclass(frozen=True)
class Shape:
    name: str
    queries: int  # c: a query chunk, or 1 for a decode step
    keys: int  # L: the scope
    q_heads: int
    kv_heads: int
    head_dim: int


FULL = (
    Shape("SmolLM2 chunk", 512, 4096, 9, 3, 64),
    Shape("8B chunk", 512, 8160, 32, 8, 128),
    Shape("8B decode", 1, 8160, 32, 8, 128),
)
QUICK = (Shape("tiny chunk", 16, 64, 6, 2, 16), Shape("tiny decode", 1, 64, 6, 2, 16))


@dataclass
class Row:
    shape: str
    queries: int
    keys: int
    heads: str  # q/kv
    head_dim: int
    backend: str  # "sdpa", or the FlashAttention package
    auto: bool  # whether attention_backend="auto" runs this backend for this shape (decode steps: SDPA)
    ms: float | None  # None: the backend cannot run here (see note)
    speedup: float | None = None  # SDPA's ms / this ms
    max_abs_diff: float | None = None  # against SDPA's output
    note: str = ""


def measure_ms(fn) -> float:
    """Median ms of fn(): do_bench on CUDA; on the CPU the median of 5 timed calls after a warm-up call."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def inputs(shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Random rotated queries [1, Hq, c, D] and scope keys / values [1, Hkv, L, D]."""
    q = torch.randn(1, shape.q_heads, shape.queries, shape.head_dim, device=device, dtype=dtype)
    k, v = torch.randn(2, 1, shape.kv_heads, shape.keys, shape.head_dim, device=device, dtype=dtype)
    return q, k, v


def bench_shape(shape: Shape, device: torch.device, dtype: torch.dtype, backends: tuple[str, ...]) -> list[Row]:
    """One row per backend: SDPA first (the reference), then FlashAttention where it runs (forced: "flash")."""
    q, k, v = inputs(shape, device, dtype)
    auto = choose_flash("auto", device, dtype, shape.head_dim, shape.queries == 1)
    scaling = shape.head_dim**-0.5
    base = dict(shape=shape.name, queries=shape.queries, keys=shape.keys,
                heads=f"{shape.q_heads}/{shape.kv_heads}", head_dim=shape.head_dim)
    reference = _attend(q, k, v, scaling).float()
    sdpa_ms = measure_ms(lambda: _attend(q, k, v, scaling))
    rows = [Row(**base, backend="sdpa", auto=auto is None, ms=sdpa_ms, speedup=1.0, max_abs_diff=0.0)]
    for backend in backends:
        try:
            kernel = choose_flash(backend, device, dtype, shape.head_dim)
        except ValueError as err:
            rows.append(Row(**base, backend=backend, auto=False, ms=None, note=str(err).split(". Fix:")[0]))
            continue
        diff = (_attend(q, k, v, scaling, kernel).float() - reference).abs().max().item()
        ms = measure_ms(lambda: _attend(q, k, v, scaling, kernel))
        rows.append(Row(**base, backend=kernel.package, auto=auto is kernel, ms=ms, speedup=sdpa_ms / ms,
                        max_abs_diff=diff))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| shape | c x L | heads q/kv | D | backend | auto | ms | vs SDPA | max abs diff |", "|---" * 9 + "|"]
    for row in rows:
        head = (f"| {row.shape} | {row.queries} x {row.keys} | {row.heads} | {row.head_dim} | {row.backend} "
                f"| {'yes' if row.auto else ''} ")
        if row.ms is None:
            lines.append(head + f"| - | - | not run: {row.note} |")
            continue
        lines.append(head + f"| {row.ms:.4f} | {row.speedup:.2f}x | {row.max_abs_diff:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for attention_backends.json (default runs/attention_backends-<timestamp>)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU in float32, SDPA only")
    args = parser.parse_args(argv)
    if not (args.quick or torch.cuda.is_available()):
        parser.error("the full shapes need a CUDA device; on the CPU run --quick")
    unwind_on_sigterm()  # stopped by `timeout` or a scheduler, the run unwinds
    device = torch.device("cpu" if args.quick else "cuda")
    dtype = torch.float32 if args.quick else torch.bfloat16
    shapes, backends = (QUICK, ()) if args.quick else (FULL, ("flash",))
    seed = time.time_ns() % 2**31
    torch.manual_seed(seed)  # fresh inputs every run
    rows = []
    with torch.inference_mode():
        for shape in shapes:
            rows += bench_shape(shape, device, dtype, backends)
            print(f"{shape.name}: done", file=sys.stderr)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "torch": torch.__version__, "flash_packages": [kernel.package for kernel in installed()[0]],
            "not_installed": list(installed()[1]), "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:],
            "seed": seed, "quick": args.quick}
    out = args.out or default_out("attention_backends")
    doc = {"meta": meta, "shapes": [asdict(shape) for shape in shapes], "rows": [asdict(row) for row in rows]}
    print_report([write_json(out / "attention_backends.json", doc)], format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
