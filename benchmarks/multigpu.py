"""One model held three ways, each prefilling and decoding the same random tokens into a ReAttentionCache (issue 19):
on one GPU (`single`), its layers split over GPUs by a device_map (`layers`: accelerate, as `from_pretrained(...,
device_map=...)` places them), and its attention heads split over ranks by transformers' tensor parallelism (`tp`:
`tp_plan="auto"` under torchrun, one GPU per rank). Per context: prefill tokens/s, decode ms/token, peak memory per
device, where the spans lie (GPU, pinned host, disk) and the greedy tokens. One layout per run, writing multigpu.json
into --out after every context; `--report` merges runs into the table (ratios against `single`, the same tokens or
not, issue 19's goals) and multigpu.png. The weights are saved once (`--save-weights`) and every layout loads them.

    python benchmarks/multigpu.py --save-weights /tmp/llama8b              # random Llama-3.1-8B-shape weights, bf16
    python benchmarks/multigpu.py --weights /tmp/llama8b --layout single --contexts 128k,1m \\
        --config benchmarks/configs/scope-8k-consensus-stride32.yaml --gpu-budget 64GiB --out runs/mg/single
    python benchmarks/multigpu.py --weights /tmp/llama8b --layout layers --gpus 2 --contexts 128k,1m \\
        --config benchmarks/configs/scope-8k-consensus-stride32.yaml --out runs/mg/layers
    torchrun --standalone --nproc_per_node 2 benchmarks/multigpu.py --weights /tmp/llama8b --layout tp \\
        --contexts 128k,1m --config benchmarks/configs/scope-8k-consensus-stride32.yaml --out runs/mg/tp
    python benchmarks/multigpu.py --report runs/mg/*/multigpu.json --out runs/mg
    python benchmarks/multigpu.py --quick --out runs/mg-quick   # all three with a tiny Llama on the CPU (tp: 2 gloo
                                                                # ranks), then the report: checks the script (CI)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from kvtier.cache import ReAttentionCache
from kvtier.config import ReAttentionConfig
from kvtier.dispatch import precompile_selection
from kvtier.errors import TierFullError
from kvtier.tools.args import add_script_options, byte_budget, format_bytes, format_length, lengths, positive, versions
from kvtier.tools.measure import decode, prefill
from kvtier.tools.model import random_llama
from kvtier.tools.output import default_out, print_report, write_json
from kvtier.tools.plots import bar_chart

LAYOUTS = ("single", "layers", "tp")
GiB = 1 << 30
DEFAULTS = {"contexts": "128k,1m", "decode_steps": 16, "warmup": 3, "prefill_chunk": 16384}
QUICK = {"contexts": "512,1k", "decode_steps": 4, "warmup": 1, "prefill_chunk": 256,
         "scope": dict(global_size=4, local_size=64, span_size=8, top_k=4, chunk_size=16)}
TP_SPEEDUP_GOAL, GOAL_CONTEXT = 1.6, 128 << 10  # issue 19: TP over 2 decodes >= 1.6x faster than 1 GPU at 128K


class MultiGpuError(Exception):
    """A bad option or machine for the layout asked; the message says how to fix it."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=LAYOUTS, help="single: one GPU; layers: a device_map over --gpus GPUs; "
                                                          "tp: tensor parallel, one rank per GPU, under torchrun")
    parser.add_argument("--weights", type=Path, help="a saved model folder (--save-weights makes one)")
    parser.add_argument("--save-weights", type=Path, metavar="DIR",
                        help="save random weights of --shape into DIR (bf16 on CUDA, built on the device) and exit")
    parser.add_argument("--shape", choices=("llama8b", "tiny"), default="llama8b", help="for --save-weights")
    parser.add_argument("--gpus", type=positive, default=2, help="GPUs the layers layout splits the layers over")
    parser.add_argument("--contexts", type=lengths, default=None, help=f"default {DEFAULTS['contexts']}")
    parser.add_argument("--decode-steps", type=positive, default=None, help=f"default {DEFAULTS['decode_steps']}")
    parser.add_argument("--prefill-chunk", type=positive, default=None,
                        help=f"prompt tokens per prefill forward (default {DEFAULTS['prefill_chunk']})")
    parser.add_argument("--config", type=Path, default=None, help="a ReAttentionConfig file (.yaml / .json)")
    parser.add_argument("--gpu-budget", type=byte_budget, default=None,
                        help="span K/V on the GPUs (all of them together; split by the layers' share), e.g. 64GiB: "
                             "the rest goes to pinned host memory (default: the config's, unlimited)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the layouts over CPU devices (layers: the map names cpu for each part; tp: gloo)")
    parser.add_argument("--report", type=Path, nargs="+", metavar="JSON", default=None,
                        help="measure nothing: merge these runs' multigpu.json into the table and multigpu.png")
    add_script_options(parser, "multigpu.json (and with --report or --quick: multigpu.png)", "multigpu")
    return parser.parse_args(argv)


# ---- loading a layout -----------------------------------------------------------------------------------------------
def layer_map(layers: int, devices: list[str]) -> dict[str, str]:
    """A device_map splitting `layers` decoder layers into len(devices) consecutive runs of (nearly) equal size, the
    embedding and rotary table with the first, the final norm and the LM head with the last."""
    parts = len(devices)
    return {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0],
            **{f"model.layers.{i}": devices[i * parts // layers] for i in range(layers)},
            "model.norm": devices[-1], "lm_head": devices[-1]}


def load(args: argparse.Namespace, dtype: torch.dtype):
    """-> the model of --weights in --layout on --device; MultiGpuError where the machine or launch does not fit."""
    if args.weights is None or not (args.weights / "config.json").is_file():
        raise MultiGpuError(f"--weights {args.weights} is no saved model folder (no config.json): make one with "
                            "--save-weights DIR, then pass --weights DIR")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise MultiGpuError("--device cuda, but torch sees no CUDA device: run on a GPU machine, or pass --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.layout == "tp":
        if world < 2:
            raise MultiGpuError("--layout tp runs one process per GPU under torchrun: torchrun --standalone "
                                "--nproc_per_node 2 benchmarks/multigpu.py --layout tp ...")
        return AutoModelForCausalLM.from_pretrained(args.weights, tp_plan="auto", dtype=dtype).eval()
    if world > 1:
        raise MultiGpuError(f"--layout {args.layout} is one process; run it without torchrun (only tp uses ranks)")
    if args.layout == "single":
        device_map = "cuda:0" if cuda else "cpu"
        return AutoModelForCausalLM.from_pretrained(args.weights, dtype=dtype, device_map=device_map).eval()
    if cuda and torch.cuda.device_count() < args.gpus:
        raise MultiGpuError(f"--layout layers --gpus {args.gpus}, but torch sees {torch.cuda.device_count()} CUDA "
                            "device(s): run on a machine with that many GPUs, or lower --gpus")
    config = json.loads((args.weights / "config.json").read_text())
    devices = [f"cuda:{i}" if cuda else "cpu" for i in range(args.gpus)]
    return AutoModelForCausalLM.from_pretrained(args.weights, dtype=dtype,
                                                device_map=layer_map(config["num_hidden_layers"], devices)).eval()


def cuda_devices(model) -> list[torch.device]:
    """The CUDA devices this process's part of the model is on (none on the CPU)."""
    return [d for d in dict.fromkeys(p.device for p in model.parameters()) if d.type == "cuda"]


def shard_config(model):
    """The model's config as this rank's attention sees it: its share of the heads under tensor parallelism."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    config = copy.copy(model.config)
    config.num_attention_heads //= world
    config.num_key_value_heads //= world
    heads = model.config.num_attention_heads
    config.head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // heads
    return config


# ---- measuring ------------------------------------------------------------------------------------------------------
def ids_of(count: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Random token ids [1, count], the same in every layout (seeded by the count)."""
    return torch.randint(0, vocab, (1, count), generator=torch.Generator().manual_seed(count)).to(device)


def measure(model, config: ReAttentionConfig, context: int, steps: int, warmup: int, chunk: int) -> dict:
    """Prefill `context` random tokens into a fresh cache, then `steps` timed greedy decode steps -> the cell."""
    devices = cuda_devices(model)
    for device in devices:
        torch.cuda.reset_peak_memory_stats(device)
    cache = ReAttentionCache(model, config)
    try:
        prefill_s = prefill(model, cache, ids_of(context, model.config.vocab_size, model.device), chunk,
                            desc=f"prefill {format_length(context)}")
        answer: list[int] = []
        times, _ = decode(model, cache, ids_of(1, model.config.vocab_size, model.device), steps, warmup,
                          desc=f"decode {format_length(context)}", answer=answer)
        stats = cache.stats()
    finally:
        cache.close()
    return {"context": context, "status": "ok", "prefill_s": round(prefill_s, 3),
            "prefill_tok_s": round(context / prefill_s, 1), "decode_ms_median": round(statistics.median(times), 3),
            "decode_ms_mean": round(statistics.fmean(times), 3), "tokens": answer,
            "span_bytes": stats["bytes"], "kv_heads": cache.layers[0].kv_heads,
            "peak_gib": {str(d): round(torch.cuda.max_memory_allocated(d) / GiB, 2) for d in devices}}


def warm_up(model, config: ReAttentionConfig, max_tokens: int, chunk: int) -> None:
    """Untimed, before the first context: the selection kernels compiled for every span count the longest context
    reaches, on every device this process holds layers on, and one short prefill and decode (CUDA set-up)."""
    for device in cuda_devices(model):
        with torch.cuda.device(device):
            precompile_selection(shard_config(model), config, max_tokens, device, model.dtype)
    cache = ReAttentionCache(model, config)
    try:
        sealed = config.global_size + config.local_size + chunk
        prefill(model, cache, ids_of(sealed, model.config.vocab_size, model.device), chunk)
        decode(model, cache, ids_of(1, model.config.vocab_size, model.device), steps=0, warmup=2)
    finally:
        cache.close()


def gathered(cell: dict) -> dict:
    """Under tensor parallelism: the cell with every rank's peaks and span bytes (summed), and whether every rank
    generated the same tokens; as is in one process."""
    if not dist.is_initialized():
        return cell
    cells: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(cells, cell)
    if cell["status"] != "ok":
        return cell
    return {**cell, "peak_gib": {d: g for c in cells for d, g in c["peak_gib"].items()},
            "span_bytes": {tier: sum(c["span_bytes"][tier] for c in cells) for tier in cell["span_bytes"]},
            "ranks_agree": all(c["tokens"] == cell["tokens"] for c in cells)}


def run(args: argparse.Namespace, quick: bool) -> Path | None:
    """Measure one layout -> the JSON written (by rank 0 under torchrun; None on the other ranks)."""
    preset = QUICK if quick else DEFAULTS
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = load(args, dtype)
    window = int(model.config.max_position_embeddings)
    config = (ReAttentionConfig(**QUICK["scope"]) if quick and args.config is None else
              ReAttentionConfig() if args.config is None else ReAttentionConfig.from_file(args.config))
    if args.gpu_budget is not None:
        config = config.replace(gpu_budget=args.gpu_budget)
    config = config.resolve(window)
    contexts = args.contexts or lengths(preset["contexts"])
    steps, warmup = args.decode_steps or preset["decode_steps"], preset["warmup"]
    chunk = args.prefill_chunk or preset["prefill_chunk"]
    rank = dist.get_rank() if dist.is_initialized() else 0
    warm_up(model, config, max(contexts) + warmup + steps, chunk)
    result = {"meta": {"command": ["benchmarks/multigpu.py", *sys.argv[1:]], "layout": args.layout,
                       "ranks": dist.get_world_size() if dist.is_initialized() else 1,
                       "devices": [str(d) for d in cuda_devices(model)] or ["cpu"],
                       "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                       "dtype": str(dtype)[6:], "weights": str(args.weights), "versions": versions(),
                       "started": datetime.now().isoformat(timespec="seconds")},
              "config": config.to_dict(), "cells": []}
    out = args.out / "multigpu.json"
    for context in contexts:
        try:
            cell = measure(model, config, context, steps, warmup, chunk)
        except (torch.OutOfMemoryError, TierFullError) as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            cell = {"context": context, "status": "error", "reason": reason}
        cell = gathered(cell)
        result["cells"].append(cell)
        if rank == 0:
            print(_cell_line(args.layout, cell), file=sys.stderr, flush=True)
            write_json(out, result)  # a run cut short keeps every finished context
    if dist.is_initialized():
        dist.barrier()
    return out if rank == 0 else None


def _cell_line(layout: str, cell: dict) -> str:
    where = f"{layout} @ {format_length(cell['context'])}"
    if cell["status"] != "ok":
        return f"{where}: {cell['reason']}"
    return (f"{where}: prefill {cell['prefill_tok_s']:,.0f} tok/s, decode {cell['decode_ms_median']:.2f} ms/token, "
            f"peak {cell['peak_gib']} GiB, host {format_bytes(cell['span_bytes']['host'])}")


# ---- the report -----------------------------------------------------------------------------------------------------
def report(paths: list[Path], out: Path) -> tuple[list[Path], str]:
    """Merge runs' multigpu.json -> (files written: multigpu.json, multigpu.png; the table with the goals)."""
    runs = []
    for path in paths:
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise MultiGpuError(f"--report {path}: not a readable multigpu.json ({err})") from None
        if not {"meta", "cells"} <= set(runs[-1]):
            raise MultiGpuError(f"--report {path} is not a benchmarks/multigpu.py multigpu.json")
    cells = {(run["meta"]["layout"], cell["context"]): cell for run in runs for cell in run["cells"]}
    order = sorted(cells, key=lambda key: (key[1], LAYOUTS.index(key[0])))  # by context, then layout
    rows = [compared(layout, cells[layout, context], cells.get(("single", context))) for layout, context in order]
    merged = {"runs": [run["meta"] for run in runs], "rows": rows, "goals": goals(rows)}
    labels = [f"{row['layout']} @ {format_length(row['context'])}" for row in rows]
    files = [write_json(out / "multigpu.json", merged),
             bar_chart(out / "multigpu.png", labels, [row.get("decode_ms_median") for row in rows], "decode ms/token",
                       "decode ms/token per layout and context (lower is faster)")]
    return files, format_table(merged)


def compared(layout: str, cell: dict, single: dict | None) -> dict:
    """One row: the cell, with its speed-ups over `single` at the same context and whether its tokens are single's."""
    row = {"layout": layout, **cell}
    if cell["status"] != "ok" or single is None or single["status"] != "ok":
        return row
    return {**row, "decode_speedup": round(single["decode_ms_median"] / cell["decode_ms_median"], 3),
            "prefill_speedup": round(cell["prefill_tok_s"] / single["prefill_tok_s"], 3),
            "same_tokens": cell["tokens"] == single["tokens"]}


def goals(rows: list[dict]) -> list[dict]:
    """Issue 19's goals where the rows measure them: TP's decode speed-up at 128K, and the longest context of each
    multi-GPU layout held with no span in host memory."""
    found = []
    for row in rows:
        if row["layout"] == "tp" and row["context"] == GOAL_CONTEXT and "decode_speedup" in row:
            found.append({"goal": f"tp decodes >= {TP_SPEEDUP_GOAL}x faster than single at 128K",
                          "measured": row["decode_speedup"], "met": row["decode_speedup"] >= TP_SPEEDUP_GOAL})
    for layout in ("layers", "tp"):
        done = [row for row in rows if row["layout"] == layout and row["status"] == "ok"]
        if done:
            longest = max(done, key=lambda row: row["context"])
            host = longest["span_bytes"]["host"] + longest["span_bytes"]["disk"]
            found.append({"goal": f"{layout} holds {format_length(longest['context'])} with no host tier",
                          "measured": format_bytes(host), "met": host == 0})
    return found


def format_table(merged: dict) -> str:
    lines = ["| context | layout | prefill tok/s | x single | decode ms/token | x single | peak GiB per device | "
             "spans in host | same tokens as single |", "|---|---|---|---|---|---|---|---|---|"]
    for row in merged["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {format_length(row['context'])} | {row['layout']} | {row['reason']} | | | | | | |")
            continue
        peaks = ", ".join(f"{device} {gib}" for device, gib in row["peak_gib"].items()) or "-"
        same = {True: "yes", False: "no", None: "-"}[row.get("same_tokens")]
        lines.append(f"| {format_length(row['context'])} | {row['layout']} | {row['prefill_tok_s']:,.0f} | "
                     f"{_ratio(row.get('prefill_speedup'))} | {row['decode_ms_median']:.2f} | "
                     f"{_ratio(row.get('decode_speedup'))} | {peaks} | {format_bytes(row['span_bytes']['host'])} | "
                     f"{same} |")
    lines += [""] + [f"goal: {goal['goal']}: {goal['measured']} -> {'met' if goal['met'] else 'missed'}"
                     for goal in merged["goals"]]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ---- --save-weights and --quick -------------------------------------------------------------------------------------
def save_weights(folder: Path, shape: str, device: str) -> None:
    """Random weights of `shape`, built on `device` (bf16 on CUDA), saved as safetensors into `folder`; written into a
    sibling folder first and renamed when complete, so an interrupted save leaves no half-written model."""
    if folder.exists():
        raise MultiGpuError(f"--save-weights {folder} exists: pass it as --weights, or remove it to save anew")
    cuda = device == "cuda" and torch.cuda.is_available()
    model = random_llama(shape, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    partial.rename(folder)


def quick(out: Path) -> tuple[list[Path], str]:
    """Every layout with the tiny Llama on the CPU (tp: 2 gloo ranks under torchrun), then the report."""
    save_weights(out / "weights", "tiny", "cpu")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, (str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")))))
    common = ["--quick", "--device", "cpu", "--weights", str(out / "weights")]
    launches = {"single": [sys.executable, __file__],
                "layers": [sys.executable, __file__],
                "tp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       __file__]}
    for layout, launch in launches.items():
        done = subprocess.run([*launch, *common, "--layout", layout, "--out", str(out / layout)], env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise MultiGpuError(f"--quick: the {layout} run failed:\n{done.stderr[-3000:]}")
    return report([out / layout / "multigpu.json" for layout in launches], out)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = args.out or default_out("multigpu")
    try:
        if args.save_weights:
            save_weights(args.save_weights, args.shape, args.device)
            print(f"saved random {args.shape} weights into {args.save_weights}", file=sys.stderr)
            return 0
        if args.report:
            print_report(*report(args.report, out))
            return 0
        if args.quick and args.layout is None:
            print_report(*quick(out))
            return 0
        if args.layout is None:
            raise MultiGpuError("give --layout single|layers|tp (or --report, --save-weights, --quick)")
        args.out = out
        written = run(args, args.quick)
        if written:
            print(f"wrote {written}")
        return 0
    except (MultiGpuError, ValueError) as err:
        print(f"multigpu.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
