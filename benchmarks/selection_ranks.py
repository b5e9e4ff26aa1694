"""Selection ranks: where span scorers rank the needle of RULER's natural-prose needle prompt (niah_single), per layer
and with the layers voting. Each prompt but its last token (which `kvtier niah` hands to generate) is prefilled
through a ReAttentionCache of the default config, which records every layer's pre-RoPE keys of every token and the
pre-RoPE queries of the question's last 64 tokens fed (a forward of their own); those queries then score the middle's
sealed spans (those after the global tokens) with each variant: the queries centred (their mean over the 64 removed)
or not, times a kind: tok (softmax over every middle token, a span's mass summed), tokmax (a span's best token score),
quest (the span's per-channel min/max bound), mean (the span's mean key), the last three softmaxed over spans; masses
summed over the queries and query heads. The needle's rank is that of its best-ranked span (0 = first). Reported per
variant: the median rank over (prompt, layer) pairs and the shares below 8, 16 and 63 (top_k at SmolLM2's window),
the rank with every layer's mass summed, and the causal consensus rank per layer (layers 0..l summed, as a layer
selecting in the forward can vote), the worst over prompts. Prompts whose needle is not yet in a sealed span are
skipped. Writes selection_ranks.json and selection_ranks.png (the consensus rank per layer) into --out; prints the
table last.

    python benchmarks/selection_ranks.py --length 12288 --depths 0.1,0.25,0.4,0.55,0.7,0.85 --out runs/ranks
    python benchmarks/selection_ranks.py --quick     # a tiny random Llama on the CPU (meaningless tokens): checks it
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvtier.cache import ReAttentionCache
from kvtier.hf import cache_keyword
from kvtier.policies import MeanPolicy, QuestPolicy, ReAttentionPolicy
from kvtier.tools.args import add_script_options, fractions, length, versions
from kvtier.tools.corpus import tokenized_corpus
from kvtier.tools.memory import release_memory
from kvtier.tools.model import load_model
from kvtier.tools.niah import PREFILL_CHUNK
from kvtier.tools.output import default_out, print_report, write_json
from kvtier.tools.plots import pyplot, save_figure
from kvtier.tools.tasks import build_task_sample

LENGTH = 12 << 10
DEPTHS = [0.1, 0.25, 0.4, 0.55, 0.7, 0.85]
# --quick: a tiny random Llama (2K window) at small scope sizes, so that most of a short prompt is sealed in spans
QUICK_LENGTH = 3000
QUICK_DEPTHS = [0.25, 0.5]
QUICK_SIZES = dict(global_size=16, span_size=16, local_size=256, top_k=8, chunk_size=64)
QUESTION_QUERIES = 64  # the consensus policy's observation window
THRESHOLDS = (8, 16, 63)  # 63: top_k of the default config at SmolLM2's 8K window
# the policy whose summary and candidate score give a span's logit per (KV head, query head of its group, query)
# (its best candidate's); "tok" instead softmaxes over every middle token (span_scores)
SPAN_POLICIES = {"tokmax": ReAttentionPolicy(), "quest": QuestPolicy(), "mean": MeanPolicy()}
KINDS = ("tok", *SPAN_POLICIES)
VARIANTS = [(centred, kind) for centred in (True, False) for kind in KINDS]


def variant_name(centred: bool, kind: str) -> str:
    return f"{'centred' if centred else 'plain'} {kind}"


def span_scores(queries: torch.Tensor, middle: torch.Tensor, span: int, kind: str, centred: bool) -> torch.Tensor:
    """queries [Hq, q, D] pre-RoPE, middle [Hkv, n*S, D] the keys of n sealed spans of `span` tokens in order ->
    [n] float32: the attention mass each span takes, summed over queries and query heads (query head h reads KV head
    h // (Hq / Hkv), as the model's grouped attention does), at the model's scale 1/sqrt(D)."""
    q_heads, _, dim = queries.shape
    kv_heads, tokens, _ = middle.shape
    queries, middle = queries.float(), middle.float()
    if centred:
        queries = queries - queries.mean(1, keepdim=True)
    grouped = queries.view(kv_heads, q_heads // kv_heads, -1, dim)  # [Hkv, g, q, D]
    if kind == "tok":
        logits = torch.einsum("kgqd,ktd->kgqt", grouped, middle) * dim**-0.5  # [Hkv, g, q, n*S]
        return logits.softmax(-1).view(*logits.shape[:3], tokens // span, span).sum((0, 1, 2, 4))
    policy = SPAN_POLICIES[kind]
    summaries = policy.summarise(middle.view(kv_heads, tokens // span, span, dim).transpose(0, 1))  # [n, Hkv, c, D]
    logits = policy.candidate_scores(grouped[None], summaries.transpose(0, 1)[None])[0].amax(-1)  # [Hkv, g, q, n]
    return (logits * dim**-0.5).softmax(-1).sum((0, 1, 2))


def needle_rank(scores: torch.Tensor, needle: range) -> int:
    """scores [n] -> the rank of the best of the spans `needle`: how many spans score higher (0 = first)."""
    return int((scores > scores[needle.start : needle.stop].max()).sum())


class Recorder:
    """Wraps every layer of `cache`: its ingest keeps each chunk's pre-RoPE keys, its select, while `asking`, each query
    chunk's pre-RoPE queries (batch row 0)."""

    def __init__(self, cache: ReAttentionCache):
        self.keys: list[list[torch.Tensor]] = [[] for _ in cache.layers]  # per layer, chunks [Hkv, c, D] float16
        self.queries: list[list[torch.Tensor]] = [[] for _ in cache.layers]  # per layer, chunks [Hq, c, D] float32
        self.asking = False
        for layer in cache.layers:
            layer.batches_forwards = False  # each query chunk through ingest and select
            layer.ingest = self._keeping_keys(layer.index, layer.ingest)
            layer.select = self._keeping_queries(layer.index, layer.select)

    def _keeping_keys(self, index: int, ingest):
        def ingest_kept(keys: torch.Tensor, values: torch.Tensor) -> None:
            self.keys[index].append(keys[0].to(torch.float16))  # float16 bounds a long prompt's 30 layers of keys
            return ingest(keys, values)

        return ingest_kept

    def _keeping_queries(self, index: int, select):
        def select_kept(queries: torch.Tensor) -> torch.Tensor:
            if self.asking:
                self.queries[index].append(queries[0].float())
            return select(queries)

        return select_kept


def capture(model, cache: ReAttentionCache, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefill the prompt `ids` but its last token (which kvtier.tools.niah.answer hands to generate) into `cache`, the
    QUESTION_QUERIES tokens before it as a forward of their own -> per layer the pre-RoPE keys of the T - 1 tokens fed
    [Hkv, T - 1, D] float16, and the pre-RoPE queries of those last QUESTION_QUERIES tokens [Hq, QUESTION_QUERIES, D]
    float32."""
    recorder = Recorder(cache)
    prompt = torch.tensor([ids], device=model.device)  # [1, T]
    question = prompt.shape[1] - 1 - QUESTION_QUERIES
    pieces = [(start, min(start + PREFILL_CHUNK, question)) for start in range(0, question, PREFILL_CHUNK)]
    keyword = cache_keyword(model)
    with torch.inference_mode():
        for start, end in tqdm(pieces, desc="prefill", unit="chunk", leave=False):
            model(input_ids=prompt[:, start:end], use_cache=True, logits_to_keep=1, **{keyword: cache})
        recorder.asking = True
        model(input_ids=prompt[:, question:-1], use_cache=True, logits_to_keep=1, **{keyword: cache})
    keys = [torch.cat(chunks, dim=1) for chunks in recorder.keys]  # per layer [Hkv, T - 1, D]
    queries = [torch.cat(chunks, dim=1) for chunks in recorder.queries]  # per layer [Hq, QUESTION_QUERIES, D]
    return keys, queries


def prompt_ranks(keys: list[torch.Tensor], queries: list[torch.Tensor], start: int, spans: int, span: int,
                 needle: range) -> dict[str, dict[str, Any]]:
    """One prompt's needle ranks per variant: per layer, with every layer summed, and the causal consensus per layer
    (layers 0..l summed). The middle's `spans` sealed spans of `span` tokens begin at token `start`."""
    ranks = {}
    for centred, kind in VARIANTS:
        mass = torch.stack([span_scores(layer_queries, layer_keys[:, start : start + spans * span], span, kind, centred)
                            for layer_keys, layer_queries in zip(keys, queries)])  # [layers, n]
        consensus = mass.cumsum(0)  # [layers, n]
        ranks[variant_name(centred, kind)] = {
            "layers": [needle_rank(scores, needle) for scores in mass],
            "all_layers": needle_rank(consensus[-1], needle),
            "consensus": [needle_rank(scores, needle) for scores in consensus],
        }
    return ranks


def summarise(per_prompt: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every scored prompt's ranks -> per variant: its ranks (per prompt), the median per-layer rank and the shares
    of (prompt, layer) pairs below each of THRESHOLDS, and the causal consensus's worst rank per layer."""
    summary = {}
    for centred, kind in VARIANTS:
        name = variant_name(centred, kind)
        layers = [ranks[name]["layers"] for ranks in per_prompt]  # [prompts][layers]
        pairs = [rank for prompt in layers for rank in prompt]
        consensus = [ranks[name]["consensus"] for ranks in per_prompt]
        summary[name] = {
            "centred": centred, "kind": kind,
            "median_layer_rank": statistics.median(pairs),
            "share_below": {str(bound): sum(rank < bound for rank in pairs) / len(pairs) for bound in THRESHOLDS},
            "all_layers_ranks": [ranks[name]["all_layers"] for ranks in per_prompt],
            "consensus_worst_ranks": [max(column) for column in zip(*consensus)],
            "layer_ranks": layers,
            "consensus_ranks": consensus,
        }
    return summary


def format_table(summary: dict[str, dict[str, Any]], prompts: int, layers: int) -> str:
    bounds = " | ".join(f"< {bound}" for bound in THRESHOLDS)
    lines = [f"needle rank (0 = first) of {QUESTION_QUERIES} question queries over {prompts} prompts x {layers} "
             f"layers:", f"| variant | median layer rank | {bounds} | all layers summed, per prompt | "
             f"causal consensus, worst per layer 0..{layers - 1} |", "|---" * (4 + len(THRESHOLDS)) + "|"]
    for name, row in summary.items():
        shares = " | ".join(f"{row['share_below'][str(bound)]:.2f}" for bound in THRESHOLDS)
        lines.append(f"| {name} | {row['median_layer_rank']:g} | {shares} | "
                     f"{' '.join(map(str, row['all_layers_ranks']))} | "
                     f"{' '.join(map(str, row['consensus_worst_ranks']))} |")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], layers: int, top_k: int, title: str, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 5))
    colors = dict(zip(KINDS, ("#4477aa", "#228833", "#aa3377", "#ccbb44")))
    for name, row in summary.items():
        worst = row["consensus_worst_ranks"]  # per layer
        ax.plot(range(layers), [rank + 1 for rank in worst], label=name, color=colors[row["kind"]],
                linestyle="-" if row["centred"] else "--", marker=".")
    ax.axhline(top_k, color="grey", linewidth=0.8, label=f"top_k = {top_k}: selected at or below")
    ax.set_yscale("log")
    ax.set_xticks(range(layers))
    ax.set_xlabel("layer l (its consensus sums the masses of layers 0..l)")
    ax.set_ylabel("needle rank + 1, worst over prompts")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=length, default=None,
                        help=f"prompt length in tokens, e.g. 12k (default {LENGTH}; --quick {QUICK_LENGTH})")
    parser.add_argument("--depths", type=fractions, default=None,
                        help=f"comma list of needle depths in [0, 1], a prompt each (default "
                             f"{','.join(map(str, DEPTHS))}; --quick {','.join(map(str, QUICK_DEPTHS))})")
    parser.add_argument("--policy", default=None,
                        help="the policy of the prefill that computes the keys (default: kvtier's default; RESULTS.md "
                             "14a used quest, the default then)")
    add_script_options(parser, "selection_ranks.json and selection_ranks.png", "selection_ranks")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    prompt_length = args.length or (QUICK_LENGTH if args.quick else LENGTH)
    depths = args.depths or (QUICK_DEPTHS if args.quick else DEPTHS)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    model, tokenizer, model_name = load_model(args.quick, device, torch.float32)
    sizes = (QUICK_SIZES if args.quick else {}) | ({"policy": args.policy} if args.policy else {})
    corpus = tokenized_corpus(tokenizer)
    config = ReAttentionCache(model, **sizes).config  # resolved for the model's window; each prompt's cache gets it
    global_size, span = config.global_size, config.span_size
    prompts, per_prompt = [], []
    for depth in tqdm(depths, desc="prompts", unit="prompt"):
        sample = build_task_sample(corpus, prompt_length, depth, "niah_single", draw=f"0:{prompt_length}:{depth}:0")
        cache = ReAttentionCache(model, config)
        keys, queries = capture(model, cache, sample.ids)
        spans = len(cache.layers[0].table)  # sealed: the middle, after the global tokens
        del cache
        first, end = sample.needle_spans[0]
        needle = range((first - global_size) // span, (end - 1 - global_size) // span + 1)  # spans with its tokens
        scored = first >= global_size and needle.stop <= spans
        prompts.append({"depth": depth, "tokens": sample.length, "needle_tokens": [first, end],
                        "needle_spans": [needle.start, needle.stop], "spans": spans, "scored": scored})
        if scored:
            per_prompt.append(prompt_ranks(keys, queries, global_size, spans, span, needle))
        else:
            tqdm.write(f"depth {depth}: the needle (tokens {first}..{end - 1}) is not in the {spans} sealed spans yet: "
                       f"skipped")
        del keys, queries
        release_memory(model.device)
    if not per_prompt:
        print("no prompt had its needle in a sealed span: raise --length or lower --depths", file=sys.stderr)
        return 1
    summary = summarise(per_prompt)
    layers = model.config.num_hidden_layers
    result = {"command": ["python", "benchmarks/selection_ranks.py", *argv], "versions": versions(),
              "date": time.strftime("%Y-%m-%d"), "model": model_name, "device": device, "dtype": str(model.dtype),
              "torch_threads": torch.get_num_threads(), "config": config.to_dict(), "corpus": corpus.info(),
              "layers": layers, "length": prompt_length, "depths": depths, "question_queries": QUESTION_QUERIES,
              "thresholds": list(THRESHOLDS), "prompts": prompts, "variants": summary}
    out = args.out or default_out("selection_ranks")
    title = (f"{model_name}, {len(per_prompt)} niah_single prompts of {prompt_length} tokens\ncausal consensus "
             f"(layers 0..l summed): the needle's worst rank")
    paths = [write_json(out / "selection_ranks.json", result),
             plot(summary, layers, config.top_k, title, out / "selection_ranks.png")]
    print_report(paths, format_table(summary, len(per_prompt), layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
