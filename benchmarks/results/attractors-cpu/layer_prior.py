"""Are the spans that take the late layers' mass at a prompt's end (RESULTS 25d) attracted by every query - a static
prior - or by the question? During a natural 16K prompt's prefill, each layer's attention mass per span is summed over
every query chunk's observation window (the text, not the question) into a prior: the mean mass a span gets from a
window that saw it. At the end the question's window mass is compared with that prior, and the needle's rank in the
layers' summed votes is computed three ways: the mass (consensus' vote), the mass less the prior, the mass over it.

    python benchmarks/results/attractors-cpu/layer_prior.py --depth 0.5 --out OUT

Writes OUT/layer-prior-DEPTH.json and prints a line per layer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kvtier import ReAttentionCache
from kvtier.tools.niah import answer
from layer_mass import needle_span_ids, prompt_and_model  # beside this script

MAX_SPANS = 1 << 14


def main(argv: list[str] | None = None) -> int:
    args, model, tokenizer, sample = prompt_and_model(__doc__.split("\n\n")[0], argv)
    cache = ReAttentionCache(model)
    config, layers = cache.config, len(cache.layers)
    policy = cache.layers[0].policy  # one policy object serves every layer (its state is per layer)
    sums, counts = torch.zeros(layers, MAX_SPANS, dtype=torch.float64), torch.zeros(layers, MAX_SPANS)
    current = {}

    def tracking(method):
        def tracked(*pos, layer, **kw):
            current["layer"] = layer
            return method(*pos, layer=layer, **kw)
        return tracked

    def recording(mass, beyond=None):
        chunks = mass[0, 0] if mass.dim() == 4 else mass[0, 0, None]  # [m, n] (one selecting head: not per KV head)
        seen = torch.ones_like(chunks, dtype=torch.bool) if beyond is None else ~beyond
        n = chunks.shape[-1]
        sums[current["layer"], :n] += (chunks * seen).sum(0).double()
        counts[current["layer"], :n] += seen.sum(0)
        return vote(mass, beyond)

    vote = policy.layer_vote
    policy.select_chunks, policy.select_at = tracking(policy.select_chunks), tracking(policy.select_at)
    policy.layer_vote = recording
    result = answer(model, list(sample.ids), cache, max_new_tokens=1)
    policy.layer_vote = vote
    needle_ids = needle_span_ids(sample, config)
    start = config.global_size
    votes = {name: 0.0 for name in ("mass", "mass - prior", "mass / prior")}
    rows = []
    with torch.inference_mode():
        for index, layer in enumerate(cache.layers):
            summaries = layer.table.summaries.view()  # [1, Hkv, n, S, D]
            mass = policy.window_mass(policy._layers[index].window, summaries, False)[0, 0].double()  # [n]
            n = mass.numel()
            prior = sums[index, :n] / counts[index, :n].clamp(min=1)
            for name, value in (("mass", mass), ("mass - prior", mass - prior), ("mass / prior", mass / prior)):
                votes[name] = votes[name] + value
            ranks = {name: int((vote_sum > vote_sum[needle_ids].max()).sum()) for name, vote_sum in votes.items()}
            top = mass.argsort(descending=True)[:3].tolist()
            rows.append({"layer": index, "needle_rank_in_votes": ranks,
                         "top": [{"span": span, "mass": float(mass[span]), "prior": float(prior[span]),
                                  "windows": int(counts[index, span]),
                                  "text": tokenizer.decode(list(sample.ids[start + span * config.span_size:
                                                                           start + (span + 1) * config.span_size]))}
                                 for span in top],
                         "needle": {"mass": float(mass[needle_ids].max()), "prior": float(prior[needle_ids].max())}})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"layer-prior-{args.depth}.json").write_text(json.dumps(
        {"length": args.length, "depth": args.depth, "needle_spans": needle_ids,
         "answer": tokenizer.decode(result.tokens), "layers": rows}, indent=1))
    for row in rows:
        tops = " | ".join(f"{t['mass']:.2f}/{t['prior']:.2f} {t['text'][:30]!r}" for t in row["top"][:2])
        print(f"layer {row['layer']:2d}: needle rank in votes {row['needle_rank_in_votes']}; needle mass/prior "
              f"{row['needle']['mass']:.2f}/{row['needle']['prior']:.2f}; top mass/prior: {tops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
