"""Where kvtier makes the host wait for the GPU: every synchronising CUDA call (torch.cuda.set_sync_debug_mode) during a
prefill beyond the scope and a greedy decode on SmolLM2 (or a tiny random Llama with --quick), counted by the innermost
kvtier (or transformers) frame that made it. A sync stops the host from queueing ahead, so the step costs the host's
time plus the GPU's instead of the larger of the two.

    python benchmarks/sync_points.py --out $OUT/sync          # on a CUDA machine; writes sync_points.json
    python benchmarks/sync_points.py --quick --out $OUT/sync  # tiny random Llama (CUDA still needed)
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch

from kvtier import ReAttentionCache
from kvtier.tools.model import load_smollm2, random_llama
from kvtier.tools.output import default_out, print_report, write_json

OURS = ("/kvtier/", "/policies/", "/kernels/", "/transformers/")


def where(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame of kvtier or transformers in `stack` as 'file:line function'."""
    frame = next((f for f in reversed(stack) if any(part in f.filename for part in OURS)), stack[-1])
    return f"{'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno} {frame.name}"


def count_syncs(run) -> collections.Counter:
    """Run `run()` with CUDA's sync debug mode warning -> syncs counted by where() of the warning's caller."""
    counted: collections.Counter = collections.Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            counted[where(traceback.extract_stack()[:-1])] += 1
        else:
            shown(message, category, filename, lineno, file, line)

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # puts showwarning back on exit
            warnings.simplefilter("always")
            warnings.showwarning = record
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return counted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama instead of SmolLM2")
    parser.add_argument("--tokens", type=int, default=None, help="prompt tokens (default 16384; --quick 2048)")
    parser.add_argument("--steps", type=int, default=64, help="greedy decode steps (default 64)")
    parser.add_argument("--out", type=Path, default=None, help="folder for sync_points.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sync_points: needs a CUDA device (CUDA's sync debug mode)", file=sys.stderr)
        return 2
    if args.quick:
        model = random_llama("tiny", "cuda", torch.bfloat16)
        config = dict(global_size=16, span_size=16, top_k=8, local_size=256, chunk_size=64)
    else:
        model, _ = load_smollm2(dtype=torch.bfloat16, device=torch.device("cuda"))
        config = {}
    tokens = args.tokens or (2048 if args.quick else 16384)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).cuda()
    report = {}
    for name, graphs in (("graphs", "auto"), ("eager", "off")):
        cache = ReAttentionCache(model, config, decode_graphs=graphs)
        with torch.inference_mode():
            model(input_ids=ids[:, :1024], past_key_values=cache)  # warm-up: compiles, first allocations
            prefill = count_syncs(lambda: model(input_ids=ids[:, 1024:], past_key_values=cache))

            def decode():
                token = ids[:, -1:]
                for _ in range(args.steps):
                    token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)

            decoded = count_syncs(decode)
        chunks = (tokens - 1024) // cache.config.chunk_size * model.config.num_hidden_layers
        report[name] = {"prefill_chunk_layers": chunks, "prefill": dict(prefill.most_common()),
                        "decode_steps": args.steps, "decode": dict(decoded.most_common())}
        print(f"== {name}: prefill of {tokens - 1024:,} tokens ({chunks:,} chunk-layers): "
              f"{sum(prefill.values())} syncs; {args.steps} decode steps: {sum(decoded.values())} syncs")
        for title, counted in (("prefill", prefill), ("decode", decoded)):
            for place, count in counted.most_common(12):
                print(f"  {title} {count:6d}  {place}")
    out = args.out or default_out("sync_points")
    print_report([write_json(out / "sync_points.json", report)], "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
