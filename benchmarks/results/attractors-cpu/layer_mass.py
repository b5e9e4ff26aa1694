"""Where each layer's attention mass goes at the end of a natural 16K prompt: for consensus' observation window (the
question's last 64 queries), per layer, the share of the window's mass on its top 10 spans, the needle's rank and
mass, and the text of the spans that take the most. At 1M the votes lose the needle from layer 18 on (RESULTS 25d):
this asks what those layers' mass favours at 16K, where the needle holds.

    python benchmarks/results/attractors-cpu/layer_mass.py --depth 0.5 --out OUT

Writes OUT/layer-mass-DEPTH.json and prints a line per layer."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kvtier import ReAttentionCache
from kvtier.tools.corpus import tokenized_corpus
from kvtier.tools.diagnose import spans_of
from kvtier.tools.model import load_smollm2
from kvtier.tools.niah import answer
from kvtier.tools.tasks import build_task_sample


def prompt_and_model(description: str, argv: list[str] | None):
    """The scripts' shared start: --length, --depth, --out parsed -> (args, model, tokenizer, the natural-text
    niah_single sample of that length and depth)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    model, tokenizer = load_smollm2(dtype=torch.float32, device="cpu")
    sample = build_task_sample(tokenized_corpus(tokenizer), args.length, args.depth,
                               draw=f"0:{args.length}:{args.depth}:0")
    return args, model, tokenizer, sample


def needle_span_ids(sample, config) -> list[int]:
    """The middle spans holding the sample's asked needle."""
    needle = [span for span, item in zip(sample.needle_spans, sample.needles) if item.asked]
    return list(spans_of([tuple(map(int, rng)) for rng in needle], config).ids)


def main(argv: list[str] | None = None) -> int:
    args, model, tokenizer, sample = prompt_and_model(__doc__.split("\n\n")[0], argv)
    cache = ReAttentionCache(model)
    config = cache.config
    result = answer(model, list(sample.ids), cache, max_new_tokens=1)
    needle_ids = needle_span_ids(sample, config)
    rows = []
    with torch.inference_mode():
        for index, layer in enumerate(cache.layers):
            policy = layer.policy
            summaries = layer.table.summaries.view()  # [1, Hkv, n, S, D]
            mass = policy.window_mass(policy._layers[index].window, summaries, False)[0, 0]  # [n]
            order = mass.argsort(descending=True)
            rank = {int(span): position for position, span in enumerate(order.tolist())}
            total = float(mass.sum())
            top = order[:10].tolist()
            start = config.global_size
            rows.append({
                "layer": index, "spans": int(mass.numel()), "top10_share": float(mass[order[:10]].sum()) / total,
                "needle_rank": min(rank[span] for span in needle_ids if span in rank),
                "needle_share": float(mass[[span for span in needle_ids if span < mass.numel()]].sum()) / total,
                "top": [{"span": span, "share": float(mass[span]) / total,
                         "text": tokenizer.decode(list(sample.ids[start + span * config.span_size:
                                                                   start + (span + 1) * config.span_size]))}
                        for span in top[:5]],
            })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"layer-mass-{args.depth}.json").write_text(json.dumps(
        {"length": args.length, "depth": args.depth, "needle_spans": list(needle_ids),
         "answer": tokenizer.decode(result.tokens), "layers": rows}, indent=1))
    for row in rows:
        print(f"layer {row['layer']:2d}: top-10 share {row['top10_share']:.2f}, needle rank {row['needle_rank']:4d} "
              f"share {row['needle_share']:.4f}; top: " + " | ".join(
                  f"{item['share']:.3f} {item['text'][:40]!r}" for item in row["top"][:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
