"""Kernel benchmark: span scoring, top-k, the scope gather, the static decode step's attention and consensus' window
scoring at 1M tokens of Llama-3.1-8B (Hq 32, Hkv 8, D 128, spans of 32, bf16), against ceilings measured in the same
run (device copy, pinned host->GPU copy), against one SDPA decode call over the ~8K-token scope that selection +
gather feed, and against the PyTorch references. Timings: triton.testing.do_bench medians
(warm-up first, L2 flushed between calls) on fresh random inputs. Writes kernels.json and kernels.png (ms per
measurement) into --out; prints the table last.

    python benchmarks/kernels.py --out benchmarks/results/kernels-h200
    python benchmarks/kernels.py --quick     # tiny shapes on the CPU (Triton interpreter): checks the script
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' definition

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from kvtier.kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402
from kvtier.kernels.scoring import score_spans, score_spans_reference  # noqa: E402
from kvtier.kernels.select import select_spans  # noqa: E402
from kvtier.kernels.topk import top_k_spans, top_k_spans_reference  # noqa: E402
from kvtier.kernels.window_mass import span_best_scores, span_best_scores_reference  # noqa: E402
from kvtier.tools.output import default_out, print_report, unwind_on_sigterm, write_json  # noqa: E402
from kvtier.tools.plots import bar_chart  # noqa: E402

GiB = 2**30
BLOCK_VECTORS = (32, 64, 128, 256)  # scoring configurations swept
NUM_WARPS = (2, 4, 8)
TOP_K_BLOCKS = (512, 1024, 2048, 4096)  # top-k first-stage block sizes swept
KEYS_PER_DOT = (16, 32, 64, 128)  # consensus window scoring configurations swept (with NUM_WARPS)
SPLIT_KEYS = (128, 256, 512, 1024)  # decode attention's keys per split swept (with NUM_WARPS)
SCORED = (("mean (c=1), max", "dot", "max"), ("quest (c=2), vote", "bound", "vote"))  # label, kind, aggregation


@dataclass(frozen=True)
class Shape:
    tokens: int  # context the summaries cover
    span: int
    q_heads: int
    kv_heads: int
    head_dim: int
    top_k: int
    global_size: int
    local_size: int
    copy_bytes: int  # size of the ceiling copies
    host_block_slots: int  # spans per pinned host block
    chunk: int  # queries of one prefill chunk
    window: int  # consensus' observation window: queries scored per query head

    @property
    def n_spans(self) -> int:
        return self.tokens // self.span

    @property
    def scope(self) -> int:
        return self.global_size + self.top_k * self.span + self.local_size


FULL = Shape(2**20, 32, 32, 8, 128, 127, 32, 4064, GiB, 256, 512, 64)
QUICK = Shape(2**10, 16, 8, 2, 64, 7, 16, 64, 2**24, 16, 16, 8)


@dataclass
class Row:
    section: str
    name: str
    ms: float | None  # None: not measured
    achieved: str = ""
    versus: str = ""  # share of the ceiling, or ratio to the baseline
    target: str = ""
    met: bool | None = None


def measure_ms(fn) -> float:
    """Median ms of fn(): do_bench on CUDA; on the CPU one timed call after a warm-up call."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e3


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms / 1e3) / 1e9


def against_ceiling(section: str, name: str, ms: float, nbytes: float, ceiling: float | None, ceiling_name: str,
                    target: float) -> Row:
    """A row for `nbytes` moved in `ms`, as a share of `ceiling` GB/s (None: not measurable here)."""
    rate = gbps(nbytes, ms)
    if ceiling is None:
        return Row(section, name, ms, f"{rate:.1f} GB/s", f"no {ceiling_name} here", f">= {target:.0%}")
    share = rate / ceiling
    return Row(section, name, ms, f"{rate:.1f} GB/s", f"{share:.0%} of {ceiling_name}", f">= {target:.0%}", share >= target)


# ---- (a) ceilings -------------------------------------------------------------------------------------------------
def ceilings(shape: Shape, device: str) -> dict[str, float | None]:
    """GB/s of a device copy (bytes read + written) and of a pinned host -> GPU copy (None without CUDA)."""
    source = torch.randint(0, 256, (shape.copy_bytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy = gbps(2 * shape.copy_bytes, measure_ms(lambda: target.copy_(source)))
    if device != "cuda":
        return {"d2d": copy, "h2d_pinned": None}
    host = torch.randint(0, 256, (shape.copy_bytes,), dtype=torch.uint8).pin_memory()
    upload_ms = measure_ms(lambda: target.copy_(host, non_blocking=True))
    return {"d2d": copy, "h2d_pinned": gbps(shape.copy_bytes, upload_ms)}


# ---- inputs -------------------------------------------------------------------------------------------------------
def decode_queries(shape: Shape, device: str) -> torch.Tensor:
    return torch.randn(1, shape.q_heads, 1, shape.head_dim, device=device, dtype=torch.bfloat16)  # [1, Hq, 1, D]


def summary_table(shape: Shape, kind: str, device: str) -> torch.Tensor:
    """[1, Hkv, n, c, D] bf16: c = 1 (mean) for "dot", (min, max) for "bound"."""
    table = torch.randn(1, shape.kv_heads, shape.n_spans, 2 if kind == "bound" else 1, shape.head_dim, device=device)
    return (table.sort(dim=3).values if kind == "bound" else table).to(torch.bfloat16)


# ---- (b) span scoring ---------------------------------------------------------------------------------------------
def bench_scoring(shape: Shape, device: str, ceiling: dict, sweep: bool) -> tuple[list[Row], dict]:
    rows, details = [], {}
    queries = decode_queries(shape, device)
    for label, kind, aggregation in SCORED:
        table = summary_table(shape, kind, device)
        nbytes = table.numel() * table.element_size()
        default = (None, 4)  # (block_vectors, num_warps)
        configs = [default] + ([(v, w) for v in BLOCK_VECTORS for w in NUM_WARPS] if sweep else [])
        timings = {
            config: measure_ms(lambda: score_spans(queries, table, kind, aggregation, block_vectors=config[0],
                                                   num_warps=config[1]))
            for config in configs
        }
        best = min(timings, key=timings.get)
        reference_ms = measure_ms(lambda: score_spans_reference(queries, table, kind, aggregation))
        for name, config in ((f"{label}: default config", default), (f"{label}: best of sweep {best}", best)):
            rows.append(against_ceiling("scoring", name, timings[config], nbytes, ceiling["d2d"], "D2D", 0.7))
            if best == default:
                break
        rows.append(Row("scoring", f"{label}: PyTorch reference", reference_ms, f"{gbps(nbytes, reference_ms):.1f} GB/s"))
        details[label] = {"summary_bytes": nbytes, "torch_reference_ms": reference_ms,
                          "ms_by_block_vectors_num_warps": {str(c): ms for c, ms in timings.items()}}
    return rows, details


# ---- (c) top-k ----------------------------------------------------------------------------------------------------
def bench_top_k(shape: Shape, device: str, sweep: bool) -> tuple[list[Row], dict]:
    rows, details = [], {}
    primary = torch.randint(0, 5, (1, shape.kv_heads, shape.n_spans), device=device).float()  # like vote counts
    secondary = torch.randn(1, shape.kv_heads, shape.n_spans, device=device)
    for label, merge in ((f"{shape.kv_heads} KV heads merged into 1", "sum"), (f"per KV head ({shape.kv_heads})", None)):
        blocks = [None] + (list(TOP_K_BLOCKS) if sweep else [])
        timings = {block: measure_ms(lambda: top_k_spans(primary, secondary, shape.top_k, merge, block_spans=block))
                   for block in blocks}
        best = min(timings, key=timings.get)
        reference_ms = measure_ms(lambda: top_k_spans_reference(primary, secondary, shape.top_k, merge))
        rows.append(Row("top-k", f"k={shape.top_k} of n={shape.n_spans}, {label}", timings[None]))
        if best is not None:
            rows.append(Row("top-k", f"  best of sweep: block_spans={best}", timings[best]))
        rows.append(Row("top-k", "  PyTorch reference (_rank)", reference_ms))
        details[label] = {"ms_by_block_spans": {str(b): ms for b, ms in timings.items()}, "torch_reference_ms": reference_ms}
    return rows, details


# ---- (d) scope gather ---------------------------------------------------------------------------------------------
@dataclass
class Scope:
    """What one layer's gather reads and writes."""

    global_kv: tuple[torch.Tensor, torch.Tensor]  # each [1, Hkv, g, D]
    local_kv: tuple[torch.Tensor, torch.Tensor]  # each [1, Hkv, w, D]
    pool: torch.Tensor  # [n, 2, Hkv, S, D]: every span on the GPU
    host_blocks: list[torch.Tensor]  # each [block_slots, 2, Hkv, S, D], pinned
    cos: torch.Tensor  # [L, D] fp32
    sin: torch.Tensor
    out: tuple[torch.Tensor, torch.Tensor]  # each [1, Hkv, L, D]

    def args(self, loc: torch.Tensor) -> tuple:
        return (self.global_kv, self.local_kv, self.pool, self.host_blocks, loc, self.cos, self.sin, *self.out)

    def random_loc(self, top_k: int, kv_heads: int, host: bool) -> torch.Tensor:
        """[1, Hkv, k] int64: k distinct slots ascending, the same for every head; host slot h written -h - 1."""
        slots = sum(block.shape[0] for block in self.host_blocks) if host else self.pool.shape[0]
        chosen = torch.randperm(slots, device=self.pool.device)[:top_k].sort().values
        return (-chosen - 1 if host else chosen).expand(1, kv_heads, -1).contiguous()


def build_scope(shape: Shape, device: str) -> Scope:
    heads, dim, dtype = shape.kv_heads, shape.head_dim, torch.bfloat16

    def kv(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.randn(1, heads, tokens, dim, device=device, dtype=dtype) for _ in range(2))

    slot = (2, heads, shape.span, dim)
    n_blocks = 4 * triton.cdiv(shape.top_k, shape.host_block_slots)  # room for 4x the spans one gather reads
    blocks = [torch.randn(shape.host_block_slots, *slot, dtype=dtype) for _ in range(n_blocks)]
    inv_freq = 1e4 ** (-torch.arange(0, dim, 2, device=device) / dim)
    angles = torch.arange(shape.scope, device=device)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1).float()  # [L, D], half-split rotary
    return Scope(
        kv(shape.global_size), kv(shape.local_size),
        torch.randn(shape.n_spans, *slot, device=device, dtype=dtype),
        [block.pin_memory() for block in blocks] if device == "cuda" else blocks,
        angles.cos(), angles.sin(), kv(shape.scope),
    )


def bench_gather(shape: Shape, ceiling: dict, scope: Scope | None) -> tuple[list[Row], dict]:
    if scope is None:
        return [Row("gather", "unavailable: kvtier.kernels.gather does not import", None)], {}
    from kvtier.kernels.gather import scope_gather, scope_gather_reference

    item = scope.pool.element_size()
    scope_bytes = 2 * shape.scope * shape.kv_heads * shape.head_dim * item  # K and V of the whole scope
    span_bytes = shape.top_k * 2 * shape.kv_heads * shape.span * shape.head_dim * item  # K and V of the k spans
    on_gpu = scope.random_loc(shape.top_k, shape.kv_heads, host=False)
    on_host = scope.random_loc(shape.top_k, shape.kv_heads, host=True)
    gpu_ms = measure_ms(lambda: scope_gather(*scope.args(on_gpu)))
    host_ms = measure_ms(lambda: scope_gather(*scope.args(on_host)))
    reference_ms = measure_ms(lambda: scope_gather_reference(*scope.args(on_gpu)))
    rows = [
        against_ceiling("gather", f"{shape.top_k} spans from the GPU pool, L={shape.scope} (read + written)", gpu_ms,
                        2 * scope_bytes, ceiling["d2d"], "D2D", 0.7),
        against_ceiling("gather", f"{shape.top_k} spans from pinned host blocks (span bytes)", host_ms, span_bytes,
                        ceiling["h2d_pinned"], "pinned H2D", 0.8),
        Row("gather", "  PyTorch reference, GPU pool", reference_ms, f"{gbps(2 * scope_bytes, reference_ms):.1f} GB/s"),
    ]
    return rows, {"scope_bytes": scope_bytes, "span_bytes": span_bytes}


# ---- (e) one decode step of one layer: selection + gather vs SDPA, the static step's attention vs SDPA -------------
def bench_decode_step(shape: Shape, device: str, scope: Scope | None, sweep: bool) -> tuple[list[Row], dict]:
    queries = decode_queries(shape, device)
    keys, values = (torch.randn(1, shape.kv_heads, shape.scope, shape.head_dim, device=device, dtype=torch.bfloat16)
                    for _ in range(2))  # each [1, Hkv, L, D]
    sdpa_ms = measure_ms(lambda: F.scaled_dot_product_attention(queries, keys, values, enable_gqa=True))
    sdpa = f"SDPA decode, q=1, {shape.q_heads}/{shape.kv_heads} heads, L={shape.scope} (unmasked, enable_gqa)"
    rows, details = [Row("decode step", sdpa, sdpa_ms)], {"sdpa_ms": sdpa_ms}
    static_rows, details["static step"] = bench_static_attention(queries, keys, values, sdpa_ms, sweep)
    rows += static_rows
    if scope is None:
        return rows + [Row("decode step", "selection + gather: unavailable (no kvtier.kernels.gather)", None)], details
    from kvtier.kernels.gather import scope_gather

    for label, kind, aggregation in SCORED:
        table = summary_table(shape, kind, device)

        def select():
            return select_spans(queries, table, kind, aggregation, 4, shape.top_k, per_kv_head=False, use_triton=True)

        def step():  # span id = GPU slot: every span on the GPU
            scope_gather(*scope.args(select().expand(-1, shape.kv_heads, -1)))

        select_ms, step_ms = measure_ms(select), measure_ms(step)
        rows.append(Row("decode step", f"{label}: selection", select_ms))
        rows.append(Row("decode step", f"{label}: selection + gather", step_ms, "", f"{step_ms / sdpa_ms:.2f}x SDPA",
                        "<= 1x", step_ms <= sdpa_ms))
        details[label] = {"select_ms": select_ms, "step_ms": step_ms}
    return rows, details


def bench_static_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sdpa_ms: float,
                           sweep: bool) -> tuple[list[Row], dict]:
    """The static decode step's attention (kvtier.fast_decode) over a buffer of bound L = keys' length, its length
    on the device: the kernel (kvtier.kernels.decode_attention) at lengths L and L/2, against SDPA over the masked
    buffer (the path without kernels) and against unmasked SDPA over exactly L keys (sdpa_ms)."""
    bound = keys.shape[2]
    full, half = (torch.tensor([n], device=keys.device) for n in (bound, bound // 2))
    kv_bytes = 2 * keys.numel() * keys.element_size()
    masked_ms = measure_ms(lambda: decode_attention_reference(queries, keys, values, full))
    default = (None, 4)  # (split_keys, num_warps)
    configs = [default] + ([(k, w) for k in SPLIT_KEYS for w in NUM_WARPS] if sweep else [])
    timings = {config: measure_ms(lambda: decode_attention(queries, keys, values, full, split_keys=config[0],
                                                           num_warps=config[1]))
               for config in configs}
    best = min(timings, key=timings.get)
    half_ms = measure_ms(lambda: decode_attention(queries, keys, values, half))
    label = f"static step over a bound of {bound}"
    rows = [Row("decode step", f"{label}: masked SDPA (no kernels)", masked_ms, f"{gbps(kv_bytes, masked_ms):.1f} GB/s",
                f"{masked_ms / sdpa_ms:.2f}x SDPA")]
    for name, config in ((f"{label}: decode kernel, length {bound}", default), (f"  best of sweep {best}", best)):
        ms = timings[config]
        rows.append(Row("decode step", name, ms, f"{gbps(kv_bytes, ms):.1f} GB/s", f"{ms / sdpa_ms:.2f}x SDPA",
                        "<= 1.5x", ms <= 1.5 * sdpa_ms))
        if best == default:
            break
    rows.append(Row("decode step", f"{label}: decode kernel, length {bound // 2}", half_ms,
                    f"{gbps(kv_bytes / 2, half_ms):.1f} GB/s", f"{half_ms / sdpa_ms:.2f}x SDPA"))
    return rows, {"masked_sdpa_ms": masked_ms, "kernel_ms": timings[default], "kernel_half_length_ms": half_ms,
                  "ms_by_split_keys_num_warps": {str(c): ms for c, ms in timings.items()}}


# ---- (f) one prefill chunk of one layer at full depth: selection vs attention -------------------------------------
def bench_prefill_chunk(shape: Shape, device: str) -> tuple[list[Row], dict]:
    """A chunk of `shape.chunk` queries selecting among every span of the context (prefill at full depth), against
    the chunk's own attention over the scope (bottom-right causal, as kvtier.attention runs it)."""
    from kvtier.attention import _attend

    queries = torch.randn(1, shape.q_heads, shape.chunk, shape.head_dim, device=device, dtype=torch.bfloat16)
    keys, values = (torch.randn(1, shape.kv_heads, shape.scope, shape.head_dim, device=device, dtype=torch.bfloat16)
                    for _ in range(2))  # each [1, Hkv, L, D]
    attend_ms = measure_ms(lambda: _attend(queries, keys, values, None))
    rows = [Row("prefill chunk", f"attention, {shape.chunk} queries, L={shape.scope} (kvtier's SDPA call)", attend_ms)]
    details = {"attention_ms": attend_ms}
    for label, kind, aggregation in SCORED:
        table = summary_table(shape, kind, device)
        candidates = table.shape[3] if kind != "bound" else 1  # dot products per (query row, span)
        flops = 2 * shape.q_heads * shape.chunk * shape.n_spans * candidates * shape.head_dim
        score_ms = measure_ms(lambda: score_spans(queries, table, kind, aggregation))
        select_ms = measure_ms(
            lambda: select_spans(queries, table, kind, aggregation, 4, shape.top_k, per_kv_head=False, use_triton=True))
        rows.append(Row("prefill chunk", f"{label}: scoring", score_ms, f"{flops / score_ms / 1e9:.1f} TFLOP/s"))
        rows.append(Row("prefill chunk", f"{label}: selection (scoring + top-k)", select_ms, "",
                        f"{select_ms / attend_ms:.2f}x attention"))
        details[label] = {"score_ms": score_ms, "select_ms": select_ms, "score_flops": flops}
    return rows, details


# ---- (g) one layer's consensus scoring at full depth --------------------------------------------------------------
def bench_consensus(shape: Shape, device: str, sweep: bool) -> tuple[list[Row], dict]:
    """The `consensus` policy's span scores, as each layer of each prefill chunk runs them: its observation window
    (shape.window centred queries per query head) against every key of the context, the kernel
    (kvtier.kernels.window_mass) against its PyTorch reference (the policy's blocked einsum + amax over S)."""
    group = shape.q_heads // shape.kv_heads
    queries = torch.randn(1, shape.kv_heads, group, shape.window, shape.head_dim, device=device,
                          dtype=torch.bfloat16)  # [1, Hkv, g, w, D]
    keys = torch.randn(1, shape.kv_heads, shape.n_spans, shape.span, shape.head_dim, device=device,
                       dtype=torch.bfloat16)  # [1, Hkv, n, S, D]
    flops = 2 * shape.q_heads * shape.window * shape.n_spans * shape.span * shape.head_dim
    default = (None, None)  # (keys_per_dot, num_warps)
    configs = [default] + ([(k, w) for k in KEYS_PER_DOT for w in NUM_WARPS] if sweep else [])
    timings = {config: measure_ms(lambda: span_best_scores(queries, keys, keys_per_dot=config[0],
                                                           num_warps=config[1]))
               for config in configs}
    best = min(timings, key=timings.get)
    reference_ms = measure_ms(lambda: span_best_scores_reference(queries, keys))
    label = f"span scores, w={shape.window} x {shape.q_heads} heads, n={shape.n_spans}"
    rows = []
    for name, config in ((f"{label}: default config", default), (f"  best of sweep {best}", best)):
        ms = timings[config]
        rate, speedup = f"{flops / ms / 1e9:.1f} TFLOP/s", f"{reference_ms / ms:.1f}x reference"
        rows.append(Row("consensus", name, ms, rate, speedup))
        if best == default:
            break
    rows.append(Row("consensus", "  PyTorch reference (blocked einsum + amax)", reference_ms,
                    f"{flops / reference_ms / 1e9:.1f} TFLOP/s"))
    return rows, {"flops": flops, "torch_reference_ms": reference_ms,
                  "ms_by_keys_per_dot_num_warps": {str(c): ms for c, ms in timings.items()}}


# ---- report -------------------------------------------------------------------------------------------------------
def format_table(rows: list[Row], ceiling: dict) -> str:
    h2d = ceiling["h2d_pinned"]
    lines = [f"ceilings: device copy {ceiling['d2d']:.0f} GB/s (read + written), pinned host->GPU "
             f"{'n/a' if h2d is None else f'{h2d:.1f} GB/s'}",
             "| section | measurement | ms | achieved | vs | target | met |", "|---" * 7 + "|"]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "NO")
        ms = "-" if row.ms is None else f"{row.ms:.4f}"
        lines.append(f"| {row.section} | {row.name} | {ms} | {row.achieved} | {row.versus} | {row.target} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for kernels.json and kernels.png (default runs/kernels-<timestamp>)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, no sweeps: on the CPU, under a minute")
    parser.add_argument("--no-sweep", action="store_true", help="skip the block-size sweeps (about a minute)")
    args = parser.parse_args(argv)
    unwind_on_sigterm()  # stopped by `timeout` or a scheduler, the run unwinds
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = QUICK if args.quick else FULL
    sweep = not (args.quick or args.no_sweep)
    seed = time.time_ns() % 2**31
    torch.manual_seed(seed)  # fresh inputs every run
    ceiling = ceilings(shape, device)
    print(f"ceilings (GB/s): {ceiling}", file=sys.stderr)
    try:
        import kvtier.kernels.gather  # noqa: F401
    except ImportError as error:
        print(f"gather unavailable: {error}", file=sys.stderr)
        scope = None
    else:
        scope = build_scope(shape, device)
    rows, details = [], {}
    sections = (
        ("scoring", lambda: bench_scoring(shape, device, ceiling, sweep)),
        ("top-k", lambda: bench_top_k(shape, device, sweep)),
        ("gather", lambda: bench_gather(shape, ceiling, scope)),
        ("decode step", lambda: bench_decode_step(shape, device, scope, sweep)),
        ("prefill chunk", lambda: bench_prefill_chunk(shape, device)),
        ("consensus", lambda: bench_consensus(shape, device, sweep)),
    )
    for section, run in tqdm(sections, desc="kernels", unit="section"):
        section_rows, details[section] = run()
        rows += section_rows
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
            "argv": sys.argv[1:], "seed": seed, "shape": asdict(shape), "ceilings_gbps": ceiling}
    out = args.out or default_out("kernels")
    doc = {"meta": meta, "rows": [asdict(row) for row in rows], "details": details}
    paths = [write_json(out / "kernels.json", doc),
             bar_chart(out / "kernels.png", [f"{row.section}: {row.name.strip()}" for row in rows],
                       [row.ms for row in rows], "ms (median; log scale)",
                       f"kernels on {meta['device']}: {shape.tokens:,} tokens of context", log=True)]
    print_report(paths, format_table(rows, ceiling))
    return 0


if __name__ == "__main__":
    sys.exit(main())
