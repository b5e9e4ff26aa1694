"""A selection diagnosis of needle prompts: each prompt answered twice with a kvtier cache, once as the policy selects
(its selections observed at the answer's queries: is every needle span in scope, at what rank) and once with the
needle's spans forced into the scope (the oracle); a JSON-ready report, its table and its plot.

Reading it: a prompt the plain run misses and the oracle finds failed in the selection (its recall and ranks say
where); one the oracle misses too fails in how the model reads the needle from re-positioned spans."""
from __future__ import annotations

import statistics
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

from kvtier.cache import ReAttentionCache
from kvtier.config import ReAttentionConfig
from kvtier.tools.args import format_length
from kvtier.tools.diagnose import Observation, force_spans, observe_selection, spans_of
from kvtier.tools.memory import release_memory
from kvtier.tools.niah import PREFILL_CHUNK, Method, answer
from kvtier.tools.plots import pyplot, save_figure


@dataclass(frozen=True)
class Probe:
    """One prompt to diagnose: its token ids, the [start, end) token ranges in them of the needle(s) the answer needs
    (not distractors), the strings a right answer holds (all of them), and the length and depth it stands for in the
    report (the report groups by length)."""

    ids: Sequence[int]
    needles: tuple[tuple[int, int], ...]
    answers: tuple[str, ...]
    length: int
    depth: float | None = None


def probe_of(sample: Any, length: int | None = None) -> Probe:
    """A haystack sample -> its Probe: a RULER NeedleSample's (kvtier.tools.tasks) asked needles and their values, a
    PasskeySample's key and the first of its `needle_spans` (the asked box; the distractors' follow). `length`: the
    requested length to report under (default: the sample's length)."""
    asked = getattr(sample, "asked", None)
    if asked is None:
        needles, answers = sample.needle_spans[:1], (sample.key,)
    else:
        needles = [span for span, needle in zip(sample.needle_spans, sample.needles) if needle.asked]
        answers = tuple(needle.value for needle in asked)
    return Probe(ids=sample.ids, needles=tuple((int(start), int(end)) for start, end in needles), answers=answers,
                 length=length or sample.length, depth=sample.depth)


def diagnose(model, tokenizer, probes: Iterable[Probe], config: ReAttentionConfig | dict | str | None = None, *,
             max_new_tokens: int = 10, prefill_chunk: int = PREFILL_CHUNK, oracle: bool = True,
             progress: bool = False) -> dict[str, Any]:
    """Answer each probe greedily as `kvtier.tools.niah.answer` does, with a new `ReAttentionCache(model, config)`
    whose decode steps all run eagerly (decode_graphs "off"), observing every layer's selection at each of the answer's
    queries (the last prompt token, then each generated token);
    with `oracle`, answer it again with the needle's spans forced into those selections. An answer is a hit when it
    holds every one of the probe's `answers`. Returns {"label", "config", "max_new_tokens", "oracle", "prompts": one
    record per probe, "summary": per length and overall (see `summarise`)}."""
    probes = list(probes)
    report: dict[str, Any] = {"label": None, "config": None, "max_new_tokens": max_new_tokens, "oracle": oracle,
                              "prompts": []}
    for probe in tqdm(probes, desc="diagnose", unit="prompt", disable=not progress):
        plain, observation, resolved = _answer(model, tokenizer, probe, config, max_new_tokens, prefill_chunk,
                                               progress, forced=False)
        report["label"], report["config"] = Method(resolved).label, resolved.to_dict()
        layers = _layer_records(observation, model.config.num_hidden_layers)
        plain["recall"] = _mean(layer["recall"] for layer in layers)
        at_answer = spans_of(probe.needles, resolved, len(probe.ids))  # where the needle is for the first answer query
        record = {"length": probe.length, "depth": probe.depth, "tokens": len(probe.ids),
                  "answers": list(probe.answers), "needles": [list(needle) for needle in probe.needles],
                  "needle_spans": list(at_answer.ids),
                  "by_construction": [list(tokens) for tokens in at_answer.by_construction],
                  "plain": plain, "layers": layers,
                  "last_layer_spans": chosen_spans(observation, tokenizer, probe, resolved)}
        if oracle:
            forced, observation, _ = _answer(model, tokenizer, probe, config, max_new_tokens, prefill_chunk,
                                             progress, forced=True)
            forced["recall"] = _mean(layer["recall"] for layer in _layer_records(observation, len(layers)))
            record["oracle"] = forced
        report["prompts"].append(record)
    report["summary"] = summarise(report["prompts"])
    return report


def _answer(model, tokenizer, probe: Probe, config, max_new_tokens: int, prefill_chunk: int, progress: bool,
            forced: bool) -> tuple[dict[str, Any], Observation, ReAttentionConfig]:
    """One greedy answer to `probe` in a new cache, its answer queries observed (and with `forced`, the needle's spans
    forced into them) -> (answer record, observation, the cache's resolved config)."""
    # every decode step eager: a static one (decode_graphs, on CUDA) reuses the last selection without calling the
    # layers' select, so the hooks would miss its query and the recall would weigh the eager steps only
    cache = ReAttentionCache(model, config, decode_graphs="off")
    resolved, answer_from = cache.config, len(probe.ids) - 1
    with ExitStack() as hooks:
        if forced:  # entered first, so the observer (wrapping it) records the forced selections
            hooks.enter_context(force_spans(cache, [spans_of(probe.needles, resolved).ids], answer_from))
        observation = hooks.enter_context(observe_selection(cache, [probe.needles], answer_from))
        result = answer(model, list(probe.ids), cache, max_new_tokens, prefill_chunk, progress)
    cache.close()
    del cache
    release_memory(model.device)
    text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    record = {"answer": text, "hit": all(wanted in text for wanted in probe.answers),
              "prefill_s": round(result.prefill_s, 3),
              "decode_s": round(result.decode_s, 3)}
    return record, observation, resolved


def chosen_spans(observation: Observation, tokenizer, probe: Probe, config: ReAttentionConfig) -> list[dict[str, Any]]:
    """What the last layer chose at the answer's first query (row 0, the first selecting head), in the scope's order:
    each span's id and text - which spans won where the needle did not."""
    records = [record for record in observation.records if record.query == 0]
    if not records:
        return []
    last = max(records, key=lambda record: record.layer)
    start = config.global_size
    return [{"span": span, "text": tokenizer.decode(list(probe.ids[start + span * config.span_size:
                                                                   start + (span + 1) * config.span_size]))}
            for span in last.selected[0][0]]


def _layer_records(observation: Observation, layers: int) -> list[dict[str, Any]]:
    """Per layer, over the answer's queries (row 0): whether every needle token was in scope, each needle span's
    rank (worst over the selecting heads; None where the policy ranks no spans) and the recall: the fraction of
    (query, needle span) pairs selected (1 where no needle span was sealed: the needle was in scope by construction)."""
    out = []
    for layer in range(layers):
        records = observation.of_layer(layer)
        recall = _mean(_mean(record.needle_selected[0]) if record.needle_selected[0] else 1.0 for record in records)
        ranks = [None if record.ranks[0] is None else [max(heads) for heads in zip(*record.ranks[0])]
                 for record in records]
        out.append({"layer": layer, "in_scope": [record.in_scope[0] for record in records], "recall": recall,
                    "ranks": ranks, "sealed": records[0].sealed if records else None})
    return out


def summarise(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per length, then one for all ("length": None): prompts; `all_selected`, the fraction of (prompt,
    layer) pairs with every needle span in scope at every answer query, and `first_selected` at the first (the last
    prompt token); `recall`, the mean over pairs of their recall (the fraction of needle spans selected, over the
    answer's queries); `median_rank`, the median over pairs of the needle's worst span rank at the first query (None
    where no span was sealed or ranked); and the plain and oracle runs' hits."""
    lengths = sorted({prompt["length"] for prompt in prompts})
    groups = [(length, [p for p in prompts if p["length"] == length]) for length in lengths] + [(None, prompts)]
    rows = []
    for length, group in groups:
        pairs = [layer for prompt in group for layer in prompt["layers"]]
        first_ranks = [max(layer["ranks"][0]) for layer in pairs if layer["ranks"] and layer["ranks"][0]]
        rows.append({
            "length": length, "prompts": len(group),
            "all_selected": _mean(all(layer["in_scope"]) for layer in pairs),
            "first_selected": _mean(layer["in_scope"][0] for layer in pairs if layer["in_scope"]),
            "recall": _mean(layer["recall"] for layer in pairs if layer["recall"] is not None),
            "median_rank": statistics.median(first_ranks) if first_ranks else None,
            "plain_hits": sum(prompt["plain"]["hit"] for prompt in group),
            "oracle_hits": sum(prompt["oracle"]["hit"] for prompt in group) if all("oracle" in p for p in group)
            else None,
        })
    return rows


def format_diagnosis(report: dict[str, Any]) -> str:
    """The summary as a table: one line per length and one for all."""
    top_k = report["config"]["top_k"] if report["config"] else None
    header = ("length", "prompts", "all selected", "first selected", "recall", f"median rank (k={top_k})", "plain",
              "oracle")
    lines = [header]
    for row in report["summary"]:
        oracle = "-" if row["oracle_hits"] is None else f"{row['oracle_hits']}/{row['prompts']}"
        lines.append(("all" if row["length"] is None else format_length(row["length"]), str(row["prompts"]),
                      _percent(row["all_selected"]), _percent(row["first_selected"]), _percent(row["recall"]),
                      "-" if row["median_rank"] is None else f"{row['median_rank']:g}",
                      f"{row['plain_hits']}/{row['prompts']}", oracle))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return f"{report['label']}\n" + "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths))
                                               for line in lines)


def plot_diagnosis(report: dict[str, Any], path: str | Path) -> Path:
    """Left: recall by layer (y) and length (x), the mean over prompts of the fraction of the needle's spans
    selected at the answer's queries, red 0 to green 1. Right: the distribution of the needle spans' ranks over all
    prompts, layers and answer queries, with the top_k line (a span ranked below it is selected)."""
    plt = pyplot()
    lengths = [row["length"] for row in report["summary"] if row["length"] is not None]
    layers = max((len(prompt["layers"]) for prompt in report["prompts"]), default=0)
    grid = [[_mean(prompt["layers"][layer]["recall"] for prompt in report["prompts"]
                   if prompt["length"] == length and prompt["layers"][layer]["recall"] is not None)
             for length in lengths] for layer in range(layers)]
    fig, (heat, hist) = plt.subplots(1, 2, figsize=(11, max(4.0, 0.22 * layers + 1.5)),
                                     gridspec_kw={"width_ratios": [1, 1.4]})
    image = heat.imshow([[float("nan") if value is None else value for value in row] for row in grid],
                        cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    heat.set_xticks(range(len(lengths)), [format_length(length) for length in lengths])
    heat.set_yticks(range(layers), [str(layer) for layer in range(layers)], fontsize=7)
    heat.set_xlabel("context length (tokens)")
    heat.set_ylabel("layer")
    for layer, row in enumerate(grid):
        for column, value in enumerate(row):
            if value is not None:
                heat.text(column, layer, f"{value:.2f}", ha="center", va="center", fontsize=6)
    heat.set_title("needle spans selected at the answer's queries", fontsize=10)
    fig.colorbar(image, ax=heat, fraction=0.05)
    ranks = [rank + 1 for prompt in report["prompts"] for layer in prompt["layers"] for query in layer["ranks"]
             if query for rank in query]
    top_k = report["config"]["top_k"]
    if ranks:
        edges = sorted({round(1.25 ** power) for power in range(0, 64) if 1.25 ** power <= max(ranks) * 1.25 + 1})
        hist.hist(ranks, bins=edges + [edges[-1] + 1], color="#4477aa")
        hist.set_xscale("log")
    hist.axvline(top_k + 0.5, color="#cc3311", linestyle="--", label=f"top_k = {top_k}")
    hist.set_xlabel("rank of a needle span under the policy (1 = best)")
    hist.set_ylabel("(prompt, layer, query, span)")
    hist.legend()
    summary = report["summary"][-1]
    oracle = "" if summary["oracle_hits"] is None else f", oracle {summary['oracle_hits']}/{summary['prompts']}"
    hist.set_title(f"plain {summary['plain_hits']}/{summary['prompts']}{oracle}\n{report['label']}", fontsize=10)
    return save_figure(fig, path)


def _mean(values: Iterable[float]) -> float | None:
    values = [float(value) for value in values]
    return sum(values) / len(values) if values else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"
