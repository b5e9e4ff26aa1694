"""Reports of `kvtier profile` runs (the dict kvtier.tools.profile builds: meta, cells, timelines): the goal check and
flatness summary, the table, the memory-vs-context and timeline plots, the JSON, and merging runs into one report."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kvtier.tools.args import format_bytes, format_length
from kvtier.tools.output import write_json
from kvtier.tools.plots import pyplot, save_figure

GiB = 2**30
GOAL_HEADROOM = 8 * GiB  # the goal: kvtier-tiers' GPU use at the largest context <= weights + this
MEASURES = (  # cell field, what it is
    ("torch_peak", "peak GPU allocated (torch)"),
    ("device_used_peak", "GPU device used (pynvml)"),
    ("rss_peak", "host RSS (peak)"),
    ("lmdb_peak", "LMDB on disk (peak)"),
)
PHASE_COLORS = {"prefill": "#bbccee", "fill": "#ccddaa", "decode": "#eeeebb"}  # unshaded: start, released
CONFIG_COLORS = {"stock": "#ee6677", "kvtier-gpu": "#4477aa", "kvtier-tiers": "#228833"}


# ---- summary --------------------------------------------------------------------------------------------------------
def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """The goal check at the largest context and the flatness of kvtier-tiers' GPU peak once past its budget."""
    weights, cells = doc["meta"]["weights_bytes"], doc["cells"]
    largest = max(doc["meta"]["contexts"])
    tiers = sorted((cell for cell in cells if cell["config"] == "kvtier-tiers"), key=lambda cell: cell["context"])
    at_largest = next((cell for cell in tiers if cell["context"] == largest), None)
    peak = None if at_largest is None else at_largest.get("torch_peak")
    limit = weights + GOAL_HEADROOM
    goal = {"config": "kvtier-tiers", "context": largest, "limit_bytes": limit, "weights_bytes": weights,
            "torch_peak_bytes": peak, "met": None if peak is None else peak <= limit,
            "device_used_peak_bytes": None if at_largest is None else at_largest.get("device_used_peak"),
            "stock_kv_bytes": doc["meta"]["kv_bytes_per_token"] * largest}
    spilled = [cell for cell in tiers if cell["status"] == "ok" and cell.get("torch_peak") is not None
               and cell["kvtier"]["spans"]["host"] + cell["kvtier"]["spans"]["disk"] > 0]
    flatness = None
    if len(spilled) >= 2:
        low, high = spilled[0], spilled[-1]
        above = (high["torch_peak"] - weights) / max(low["torch_peak"] - weights, 1)
        flatness = {"config": "kvtier-tiers", "contexts": [cell["context"] for cell in spilled],
                    "torch_peak_bytes": [cell["torch_peak"] for cell in spilled],
                    "ratio": high["torch_peak"] / low["torch_peak"], "ratio_above_weights": above}
    return {"goal": goal, "flatness": flatness}


# ---- text -----------------------------------------------------------------------------------------------------------
def format_cell(cell: dict[str, Any]) -> str:
    """One line per cell, for the log."""
    name = f"{cell['config']} {format_length(cell['context'])}"
    if cell["status"] == "skipped":
        return f"{name}: skipped, {cell['reason']}"
    figures = (f"peak GPU {format_bytes(cell.get('torch_peak'))} (torch), device used "
               f"{format_bytes(cell['device_used_peak'])}, RSS {format_bytes(cell['rss_peak'])}, LMDB "
               f"{format_bytes(cell['lmdb_peak'])}")
    if cell["status"] == "failed":
        return f"{name}: FAILED ({cell['reason']}); {figures}"
    return f"{name}: built in {cell['build_s']:.1f} s, decode {cell['decode_ms']:.1f} ms/token; {figures}"


def format_table(doc: dict[str, Any]) -> str:
    """Memory per configuration (rows, one per measure) and context (columns), then the goal, flatness and skips."""
    meta, summary = doc["meta"], summarize(doc)
    contexts = meta["contexts"]
    cells = {(cell["config"], cell["context"]): cell for cell in doc["cells"]}
    lines = [f"{meta['model']}, {meta['dtype']} on {meta['device']}: weights {format_bytes(meta['weights_bytes'])}, "
             f"KV {format_bytes(meta['kv_bytes_per_token'])} per token",
             "| config | measure | " + " | ".join(format_length(context) for context in contexts) + " |",
             "|---|---|" + "---|" * len(contexts)]
    for config in meta["configs"]:
        for index, (field, label) in enumerate(MEASURES):
            row = [_table_value(cells.get((config, context)), field) for context in contexts]
            lines.append(f"| {config if index == 0 else ''} | {label} | " + " | ".join(row) + " |")
    goal = summary["goal"]
    verdict = {True: "MET", False: "MISSED", None: "not measured"}[goal["met"]]
    lines.append(f"\nContexts: stock prefills for real ({meta['prefill_chunk']}-token chunks); kvtier is filled with "
                 f"kvtier.tools.longctx.fill (a {meta['sample_tokens']}-token prefill's K/V, tiled); then "
                 f"{meta['decode_steps']} decode steps. kvtier-tiers: gpu_budget "
                 f"{format_bytes(meta['gpu_budget'])}, host_budget {format_bytes(meta['host_budget'])}, LMDB in "
                 f"{meta['disk_path']}.")
    lines.append(f"Goal, kvtier-tiers at {format_length(goal['context'])}: peak GPU "
                 f"{format_bytes(goal['torch_peak_bytes'])} <= weights + 8 GiB = {format_bytes(goal['limit_bytes'])}: "
                 f"{verdict} (stock would need {format_bytes(goal['stock_kv_bytes'])} of KV alone).")
    flat = summary["flatness"]
    if flat is not None:
        lines.append(f"Flatness, kvtier-tiers' peak GPU once spilling ({format_length(flat['contexts'][0])}.."
                     f"{format_length(flat['contexts'][-1])}): {flat['ratio']:.2f}x "
                     f"({flat['ratio_above_weights']:.2f}x above the weights).")
    for cell in doc["cells"]:
        if cell["status"] != "ok":
            lines.append(f"{cell['status']}: {cell['config']} {format_length(cell['context'])}: {cell['reason']}")
    return "\n".join(lines)


def _table_value(cell: dict[str, Any] | None, field: str) -> str:
    if cell is None or cell["status"] == "skipped":
        return "-"
    value = format_bytes(cell.get(field))
    return value if cell["status"] == "ok" else f"{value} (failed)"


# ---- plots ----------------------------------------------------------------------------------------------------------
def _unit(largest: float) -> tuple[str, int]:
    """The unit to plot bytes in whose largest value is `largest`."""
    return next((name, scale) for name, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10), ("bytes", 1))
                if largest >= scale or scale == 1)


def plot_memory(doc: dict[str, Any], path: Path) -> None:
    """Four panels (torch's GPU peak, device used, host RSS, LMDB bytes) against the context, one line per config."""
    plt = pyplot()
    meta = doc["meta"]
    contexts, weights = meta["contexts"], meta["weights_bytes"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for ax, (field, label) in zip(axes.flat, MEASURES):
        lines = {}  # label -> (contexts, bytes)
        for config in meta["configs"]:
            points = [(cell["context"], cell[field]) for cell in doc["cells"]
                      if cell["config"] == config and cell["status"] == "ok" and cell.get(field) is not None]
            if points:
                lines[config] = list(zip(*points))
        if lines and field in ("torch_peak", "device_used_peak"):
            lines["weights + full KV"] = (contexts, [weights + meta["kv_bytes_per_token"] * n for n in contexts])
        unit, scale = _unit(max((value for _, values in lines.values() for value in values), default=0))
        for name, (xs, values) in lines.items():
            if name in CONFIG_COLORS:
                ax.plot(xs, [value / scale for value in values], marker="o", label=name, color=CONFIG_COLORS[name])
            else:  # what stock would hold at every context: it leaves the device first
                ax.plot(xs, [value / scale for value in values], ls="--", color=CONFIG_COLORS["stock"], alpha=0.5,
                        label=name)
                ax.axhline(weights / scale, ls=":", color="gray", label="weights")
                ax.axhline((weights + GOAL_HEADROOM) / scale, ls="-.", color="black", lw=0.8, label="weights + 8 GiB")
        if lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured here", transform=ax.transAxes, ha="center", color="gray")
        ax.set_title(label, fontsize=10)
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [format_length(context) for context in contexts])
        ax.minorticks_off()
    for ax in axes[1]:
        ax.set_xlabel("context (tokens)")
    fig.suptitle(f"Memory vs context - {meta['model']}, {meta['dtype']} on {meta['device']}")
    save_figure(fig, path, dpi=110)


def plot_timeline(doc: dict[str, Any], path: Path) -> None:
    """The sampled timeline of every config at the largest context measured, one after the other, phases shaded."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    context = max((timeline["context"] for timeline in doc["timelines"]), default=None)
    timelines = [timeline for timeline in doc["timelines"] if timeline["context"] == context]
    panels = ((axes[0], (("torch_allocated", "GPU allocated (torch)", "#4477aa"),
                         ("device_used", "GPU device used (pynvml)", "#66ccee"))),
              (axes[1], (("rss", "host RSS", "#aa3377"), ("disk", "LMDB on disk", "#ccbb44"))))
    starts, offset = [], 0.0  # each timeline's t starts at 0: lay them end to end
    for timeline in timelines:
        starts.append(offset - timeline["t"][0])
        offset = starts[-1] + timeline["t"][-1] + 0.02 * max(timeline["t"][-1], 1e-3)
    shaded = set()
    for timeline, start in zip(timelines, starts):
        times = [start + t for t in timeline["t"]]
        for begin, end, phase in _phase_runs(times, timeline["phase"]):
            if phase in PHASE_COLORS:
                for ax in axes:
                    ax.axvspan(begin, end, color=PHASE_COLORS[phase], lw=0,
                               label=f"phase: {phase}" if ax is axes[0] and phase not in shaded else None)
                shaded.add(phase)
        axes[0].axvline(times[0], color="black", lw=0.6)
        axes[0].text(times[0], 1.01, f" {timeline['config']}", transform=axes[0].get_xaxis_transform(), fontsize=8)
    for ax, series in panels:
        values = [value for timeline in timelines for field, _, _ in series for value in timeline[field]
                  if value is not None]
        unit, scale = _unit(max(values, default=0))
        for field, label, color in series:
            for timeline, start in zip(timelines, starts):
                ys = [math.nan if value is None else value / scale for value in timeline[field]]
                if not all(math.isnan(y) for y in ys):
                    shown = label in ax.get_legend_handles_labels()[1]
                    ax.plot([start + t for t in timeline["t"]], ys, color=color, lw=1.2, label=None if shown else label)
        ax.set_ylabel(unit)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    if context is None:
        axes[0].text(0.5, 0.5, "no cell was measured", transform=axes[0].transAxes, ha="center", color="gray")
    axes[1].set_xlabel("seconds (configurations run one after the other)")
    title = "" if context is None else f" at {format_length(context)} tokens"
    fig.suptitle(f"Memory timeline{title} - {doc['meta']['model']}", y=0.995)
    save_figure(fig, path, dpi=110)


def _phase_runs(times: list[float], phases: list[str]) -> list[tuple[float, float, str]]:
    """Consecutive samples of one phase -> (start, end, phase), each run ending where the next begins."""
    runs = []
    for index, (time, phase) in enumerate(zip(times, phases)):
        if not runs or runs[-1][2] != phase:
            if runs:
                runs[-1][1] = time
            runs.append([time, time, phase])
        if index == len(times) - 1:
            runs[-1][1] = time
    return [tuple(run) for run in runs]


# ---- files ----------------------------------------------------------------------------------------------------------
def write_profile(doc: dict[str, Any], out: Path) -> Path:
    """profile.json in `out` (meta, summary, cells, then the timelines), replaced whole."""
    ordered = {"meta": doc["meta"], "summary": summarize(doc), "cells": doc["cells"], "timelines": doc["timelines"]}
    return write_json(out / "profile.json", ordered)


def write_report(doc: dict[str, Any], out: Path) -> list[Path]:
    """profile.json, profile-memory.png and profile-timeline.png in `out` -> their paths."""
    paths = [write_profile(doc, out), out / "profile-memory.png", out / "profile-timeline.png"]
    plot_memory(doc, paths[1])
    plot_timeline(doc, paths[2])
    return paths


def load_reports(paths: list[Path]) -> list[dict[str, Any]]:
    """profile.json files (or folders holding one) -> their dicts; ValueError naming a missing or foreign file."""
    docs = []
    for path in paths:
        path = path / "profile.json" if path.is_dir() else path
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read a profile from {str(path)!r}: {err}") from None
        if not isinstance(doc, dict) or not {"meta", "cells", "timelines"} <= set(doc):
            raise ValueError(f"{str(path)!r} is not a `kvtier profile` profile.json")
        docs.append(doc)
    return docs


def merge_reports(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of one model -> one report: per (config, context) the last cell that ran to the end (a rerun of a cell
    supersedes it), else the last one."""
    first = docs[0]["meta"]
    identity = ("model", "shape", "dtype")
    for doc in docs[1:]:
        if [doc["meta"][key] for key in identity] != [first[key] for key in identity]:
            raise ValueError(f"cannot merge profiles of different models: {first['model']} {first['dtype']} and "
                             f"{doc['meta']['model']} {doc['meta']['dtype']}")
    chosen: dict[tuple[str, int], tuple[int, dict]] = {}
    for index, doc in enumerate(docs):
        for cell in doc["cells"]:
            key = (cell["config"], cell["context"])
            if key not in chosen or cell["status"] == "ok" or chosen[key][1]["status"] != "ok":
                chosen[key] = (index, cell)
    configs = list(dict.fromkeys(config for doc in docs for config in doc["meta"]["configs"]))
    order = sorted(chosen, key=lambda key: (key[1], configs.index(key[0])))
    timelines = []
    for key in order:
        index, _ = chosen[key]
        timelines += [t for t in docs[index]["timelines"] if (t["config"], t["context"]) == key]
    meta = {**first, "configs": configs, "contexts": sorted({context for _, context in chosen}),
            "merged_from": [doc["meta"]["command"] for doc in docs]}
    return {"meta": meta, "cells": [chosen[key][1] for key in order], "timelines": timelines}
