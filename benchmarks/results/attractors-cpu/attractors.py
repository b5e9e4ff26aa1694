"""Does prose dense in the question's common words push the needle out of consensus' selection at 12K tokens, as
the packaged prose does at 1M (RESULTS 25d: the needle in scope at layers 2-17, out from layer 18 on)? A 1M prompt
holds ~1,400 corpus sentences with "number" in them (a 12K prompt ~20, fewer than top_k = 63): if such spans are what
displaces the needle, a 12K haystack made only of those sentences should show the 1M failure on a CPU.

    python benchmarks/results/attractors-cpu/attractors.py --haystack dense --out OUT
    python benchmarks/results/attractors-cpu/attractors.py --haystack plain --out OUT

Writes OUT/diagnosis-HAYSTACK.json (kvtier.tools.diagnosis' report, oracle off) and prints each prompt's recall by
layer and the text of the spans the last layer chose."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kvtier.tools.corpus import TokenizedCorpus, corpus_sentences
from kvtier.tools.diagnosis import diagnose, format_diagnosis, probe_of
from kvtier.tools.model import load_smollm2
from kvtier.tools.tasks import build_task_sample

WORDS = ("number", "special", "magic", "mentioned", "provided")  # the question's words that recur in the prose


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--haystack", choices=("dense", "plain"), required=True)
    parser.add_argument("--length", type=int, default=12288)
    parser.add_argument("--depths", default="0.2,0.5,0.8")
    parser.add_argument("--config", default=None, help="a kvtier config (default: the library's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    model, tokenizer = load_smollm2(dtype=torch.float32, device="cpu")
    sentences = corpus_sentences()
    if args.haystack == "dense":
        sentences = tuple(s for s in sentences if any(word in s.lower() for word in WORDS))
    corpus = TokenizedCorpus(tokenizer, sentences)
    depths = [float(depth) for depth in args.depths.split(",")]
    probes = [probe_of(build_task_sample(corpus, args.length, depth, draw=f"0:{args.length}:{depth}:0"))
              for depth in depths]
    report = diagnose(model, tokenizer, probes, args.config, oracle=False, progress=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"diagnosis-{args.haystack}.json").write_text(json.dumps(report, indent=1))
    print(f"{args.haystack}: {len(sentences)} sentences, {corpus.tokens} tokens")
    for prompt in report["prompts"]:
        print(f"depth {prompt['depth']}: hit {prompt['plain']['hit']} {prompt['plain']['answer']!r}")
        print("  recall by layer:", " ".join(f"{layer['recall']:.1f}" for layer in prompt["layers"]))
        print("  last layer's spans:", " | ".join(span["text"] for span in prompt["last_layer_spans"][-12:]))
    print(format_diagnosis(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
