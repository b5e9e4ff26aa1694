"""What `kvtier bench` reports: the goals (ratios between cells of one run), bench.json, bench.png, the tables."""
from __future__ import annotations

from pathlib import Path

from kvtier.tools.args import format_length
from kvtier.tools.output import write_json
from kvtier.tools.plots import pyplot, save_figure

METHODS = ("stock", "offloaded", "kvtier", "kvtier-host", "kvtier-disk")  # run order, and the rows of every table
KVTIER_METHODS = METHODS[2:]
MiB = 1 << 20


# ---- goals ----------------------------------------------------------------------------------------------------------
def goals(result: dict) -> list[dict]:
    """The issue's targets, each a ratio of two cells of this run: {name, goal, compared, ratio, op, target, met,
    note}; ratio and met are None where a cell is missing (the note says which)."""
    contexts = result["settings"]["contexts"]
    lo, hi = contexts[0], contexts[-1]
    kv_lo, kv_hi = _kvtier(result, lo), _kvtier(result, hi)
    stock_lo = _ok(result, "stock", lo)
    both_real = [c for c in contexts if _real(_ok(result, "stock", c)) and _real(_kvtier(result, c))]
    reference = 32 << 10 if _kvtier(result, 32 << 10) and hi > 32 << 10 else lo
    both_decoded = [c for c in contexts if _ok(result, "offloaded", c) and _ok(result, "kvtier-host", c)]
    at = both_real[-1] if both_real else None
    host_at = both_decoded[-1] if both_decoded else None
    return [
        _goal("decode_flat", "kvtier decode at the longest context within 1.3x of kvtier's at the shortest",
              (kv_hi, hi, "kvtier"), (kv_lo, lo, "kvtier"), _decode_ms, "<=", 1.3,
              None if hi > lo else "needs two --contexts"),
        _goal("decode_vs_stock", "kvtier decode within 1.5x of stock's at the shortest context",
              (kv_lo, lo, "kvtier"), (stock_lo, lo, "stock"), _decode_ms, "<=", 1.5),
        _goal("prefill_vs_stock", "kvtier prefill at least as fast as stock full attention (real prefills, the "
              "longest context both have)", (_kvtier(result, at), at, "kvtier"),
              (_ok(result, "stock", at), at, "stock"), _prefill_tok_s, ">=", 1.0,
              None if at else "needs a real prefill of stock and of kvtier at one context"),
        _goal("prefill_flat", "kvtier prefill tok/s at 32K (or the shortest context) within 1.5x of its tok/s at "
              "the longest", (_kvtier(result, reference), reference, "kvtier"), (kv_hi, hi, "kvtier"),
              _prefill_tok_s, "<=", 1.5, None if hi > reference else "needs a context longer than the reference"),
        _goal("host_vs_offloaded", "HF's offloaded cache at least 3x slower per decoded token than kvtier-host "
              "(the longest context both have)", (_ok(result, "offloaded", host_at), host_at, "offloaded"),
              (_ok(result, "kvtier-host", host_at), host_at, "kvtier-host"), _decode_ms, ">=", 3.0,
              None if host_at else "needs offloaded and kvtier-host decoded at one context"),
        _same_answer(result),
    ]


def _same_answer(result: dict) -> dict:
    """Whether a tiered cell (kvtier-disk, else kvtier-host) decodes the greedy tokens of the all-on-GPU kvtier cell at
    the longest context both have: ratio = the share of its tokens, from the first, that agree (1 = the same answer)."""
    tiered_methods = ("kvtier-host", "kvtier-disk")  # the later preferred where both ran
    pairs = [(context, tiered) for context in result["settings"]["contexts"] for tiered in tiered_methods
             if _ok(result, tiered, context) and _ok(result, "kvtier", context)]
    context, tiered = pairs[-1] if pairs else (None, "kvtier-disk")
    goal = {"name": "tiers_same_answer", "goal": "a tiered kvtier cell decodes the all-on-GPU cell's greedy tokens "
            "(the longest context both have; ratio: the share of tokens that agree from the first)",
            "compared": f"{tiered} @ {format_length(context)} / kvtier @ {format_length(context)}", "ratio": None,
            "op": ">=", "target": 1.0, "met": None, "note": None}
    if context is None:
        return goal | {"note": "needs kvtier and kvtier-host or kvtier-disk decoded at one context"}
    ours, reference = (_ok(result, method, context)["decode"].get("tokens") for method in (tiered, "kvtier"))
    if not ours or not reference:
        return goal | {"note": "no decoded tokens recorded (results written before they were)"}
    agree = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    ratio = agree / len(reference)
    return goal | {"ratio": round(ratio, 3), "met": ratio >= 1.0}


def _goal(name: str, text: str, top: tuple, bottom: tuple, metric, op: str, target: float,
          missing: str | None = None) -> dict:
    """ratio = metric(top cell) / metric(bottom cell), each given as (cell or None, context, method named when the
    cell is None); `missing` says why the goal cannot be computed in this run."""
    sides = [(cell, context, cell["method"] if cell else method) for cell, context, method in (top, bottom)]
    compared = " / ".join(f"{method} @ {format_length(context)}" for _, context, method in sides)
    goal = {"name": name, "goal": text, "compared": compared, "ratio": None, "op": op, "target": target,
            "met": None, "note": missing}
    absent = [f"{method} @ {format_length(context)}" for cell, context, method in sides if cell is None]
    if missing or absent:
        goal["note"] = missing or f"not measured: no {' and no '.join(absent)}"
        return goal
    (a, _, _), (b, _, _) = sides
    ratio = metric(a) / metric(b)
    goal.update(ratio=round(ratio, 3), met=ratio <= target if op == "<=" else ratio >= target)
    if metric is _prefill_tok_s and "after-fill" in (a["prefill"]["kind"], b["prefill"]["kind"]):
        goal["note"] = "after-fill: the last chunk's tok/s at full depth, a lower bound of the whole prefill's"
    return goal


def _ok(result: dict, method: str, context: int | None) -> dict | None:
    for cell in result["cells"]:
        if cell["method"] == method and cell["context"] == context and cell["status"] == "ok":
            return cell
    return None


def _kvtier(result: dict, context: int | None) -> dict | None:
    """kvtier's cell at `context`: all on the GPU where it ran, else the first tiered one that did."""
    return next((c for c in (_ok(result, m, context) for m in KVTIER_METHODS) if c), None)


def _real(cell: dict | None) -> bool:
    return cell is not None and cell["prefill"]["kind"] == "real"


def _decode_ms(cell: dict) -> float:
    """A cell's ms per token: the mean over its steps (a graph-replayed decode mixes fast static steps with eager
    ones: the mean is what a user waits), the median for results written before the mean was recorded."""
    return cell["decode"].get("ms_mean", cell["decode"]["ms_median"])


def _launch_cell(cell: dict) -> str:
    counted = cell["launches"]
    if not counted:
        return "-"
    host = f" ({counted['host_launches']})" if "host_launches" in counted else ""  # older results lack it
    return f"{counted['kernels']} + {counted['copies']}{host}"


def _prefill_tok_s(cell: dict) -> float:
    return cell["prefill"]["tok_s"]


# ---- transfers ------------------------------------------------------------------------------------------------------
def transfer_figures(method: str, moved: dict, ceilings: dict | None, step_ms: float) -> dict:
    """How a decode step's copies `moved` (bytes per direction) compare with the copy ceilings measured in the same
    run: {source, ceiling, floor_ms, pct_of_ceiling}. Both directions use pinned host memory (kvtier's pools; the
    offloaded cache's CPU copies, which torch pins for a non-blocking GPU->CPU copy) and run on their own copy engines
    at once, so the floor is the slower direction at its ceiling; 100% = the step is no longer than that floor."""
    source = ("estimated: the whole KV each way" if method == "offloaded"
              else "measured: cache.stats() over the decode steps")
    figures = {"source": source, "ceiling": "pinned", "floor_ms": None, "pct_of_ceiling": None}
    if ceilings is not None:
        floor_s = max(moved["host->gpu"] / (ceilings["pinned_h2d_gbps"] * 1e9),
                      moved["gpu->host"] / (ceilings["pinned_d2h_gbps"] * 1e9))
        figures.update(floor_ms=round(floor_s * 1e3, 3), pct_of_ceiling=round(100 * floor_s * 1e3 / step_ms, 1))
    return figures


def refresh(result: dict) -> dict:
    """An earlier run's result with what is derived from its measurements computed again by this version: the
    transfer floors and the goals."""
    for cell in result["cells"]:
        if cell["status"] == "ok" and cell.get("transfer"):
            moved = cell["transfer"]["bytes_per_token"]
            cell["transfer"].update(transfer_figures(cell["method"], moved, result["ceilings"],
                                                     cell["decode"]["ms_median"]))
    result["goals"] = goals(result)
    return result


def merge_results(results: list[dict]) -> dict:
    """Several runs' results (each refreshed) -> one report: their cells by (method, context), a later run's cell
    replacing an earlier one's unless it did not run; the first run's meta and ceilings, every run's command."""
    results = [refresh(result) for result in results]
    cells: dict[tuple[str, int], dict] = {}
    for result in results:
        for cell in result["cells"]:
            key = (cell["method"], cell["context"])
            if key not in cells or cell["status"] == "ok" or cells[key]["status"] != "ok":
                cells[key] = cell
    merged = {**results[0], "meta": {**results[0]["meta"], "commands": [r["meta"]["command"] for r in results]}}
    methods = {method for method, _ in cells}
    merged["settings"] = {**results[0]["settings"], "contexts": sorted({context for _, context in cells}),
                          "methods": [method for method in METHODS if method in methods]}
    merged["cells"] = [cells[key] for key in sorted(cells, key=lambda k: (METHODS.index(k[0]), k[1]))]
    merged["goals"] = goals(merged)
    return merged


# ---- files ----------------------------------------------------------------------------------------------------------
def write_report(result: dict, out: Path, plot: bool = True) -> list[Path]:
    """bench.json (replaced atomically) and, with `plot`, bench.png into `out` -> the paths written."""
    path = write_json(out / "bench.json", result)
    if not plot:
        return [path]
    return [path, plot_cells(result, out / "bench.png")]


def plot_cells(result: dict, path: Path) -> Path:
    """Two panels against context (log x): decode ms/token and prefill tok/s, one line per method."""
    plt = pyplot()
    fig, (decode, prefill) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        cells = [c for c in result["cells"] if c["method"] == method and c["status"] == "ok"]
        if not cells:
            continue
        x = [c["context"] for c in cells]
        line, = decode.plot(x, [_decode_ms(c) for c in cells], marker="o", label=method)
        prefill.plot(x, [_prefill_tok_s(c) for c in cells], marker="o", color=line.get_color(), label=method)
        after = [c for c in cells if c["prefill"]["kind"] == "after-fill"]
        prefill.scatter([c["context"] for c in after], [_prefill_tok_s(c) for c in after], s=90,
                        facecolors="none", edgecolors=line.get_color())
    contexts = result["settings"]["contexts"]
    for axis, title in ((decode, "decode ms / token (mean)"),
                        (prefill, "prefill tokens / s (ringed: last chunk after a fill)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, [format_length(c) for c in contexts])
        axis.set_xlabel("context (tokens)")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.set_yscale("log")
    decode.legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"kvtier bench: {meta['model']}, {meta['device']}, {meta['dtype']}", fontsize=11)
    return save_figure(fig, path)


# ---- tables ---------------------------------------------------------------------------------------------------------
def format_report(result: dict) -> str:
    """The tables printed at the end of a run: per method x context decode, prefill, peak memory and kernel
    launches; the tier transfers; what was not measured and why; the goals."""
    meta, settings, ceilings = result["meta"], result["settings"], result["ceilings"]
    contexts = settings["contexts"]
    parts = [f"kvtier bench: {meta['model']} ({meta['kv_bytes_per_token'] / 1024:g} KiB of KV per token), "
             f"{meta['device']}, {meta['dtype']}; decode = mean of {settings['decode_steps']} greedy steps after "
             f"{settings['warmup']} warm-up"]
    if ceilings:
        parts.append("ceilings measured in this run, 1 GiB bulk copies, GB/s: pinned host->GPU "
                     f"{ceilings['pinned_h2d_gbps']}, GPU->host {ceilings['pinned_d2h_gbps']}; pageable "
                     f"{ceilings['pageable_h2d_gbps']} / {ceilings['pageable_d2h_gbps']}")
    methods = [m for m in METHODS if m in settings["methods"]]
    chunk = f"{settings['prefill_chunk']:,}"
    tables = (
        ("decode ms/token", lambda c: f"{_decode_ms(c):.1f}"),
        (f"prefill tok/s (r: real chunked prefill of the whole context; f: the last {chunk}-token chunk after a "
         "fill, at full depth)", lambda c: f"{_prefill_tok_s(c):,.0f} {'r' if _real(c) else 'f'}"),
    )
    if result["ceilings"]:  # measured on CUDA only
        tables += (("peak GPU GiB (whole cell: prefill or fill, then decode)",
                    lambda c: _or_dash(c["peak_gpu_gib"], "{:.1f}")),
                   ("peak GPU GiB during decode", lambda c: _or_dash(c["decode_peak_gpu_gib"], "{:.1f}")),
                   ("CUDA work per decode step: kernels + memcpy/memset (host launch calls)", _launch_cell))
    for title, show in tables:
        parts.append(f"{title}\n" + _grid(result, methods, contexts, show))
    transfers = [c for c in result["cells"] if c["status"] == "ok" and c["transfer"]]
    if transfers:
        lines = ["| method | context | host->GPU MB | GPU->host MB | disk->host MB | copy floor ms | % of ceiling |",
                 "|---|---|---|---|---|---|---|"]
        for c in transfers:
            t, moved = c["transfer"], c["transfer"]["bytes_per_token"]
            lines.append(f"| {c['method']} | {format_length(c['context'])} | {moved['host->gpu'] / MiB:,.1f} | "
                         f"{moved['gpu->host'] / MiB:,.1f} | {moved.get('disk->host', 0) / MiB:,.1f} | "
                         f"{_or_dash(t['floor_ms'], '{:.2f}')} | {_or_dash(t['pct_of_ceiling'], '{:.0f}%')} "
                         f"({t['ceiling']}) |")
        parts.append("transfers per decoded token (% of ceiling: the copy floor - the slower direction at its "
                     "measured pinned ceiling, both directions running at once - over the step's measured time; "
                     "offloaded: the whole KV each way, estimated)\n"
                     + "\n".join(lines))
    missing = [c for c in result["cells"] if c["status"] != "ok"]
    if missing:
        parts.append("not measured\n" + "\n".join(
            f"- {c['method']} @ {format_length(c['context'])}: {c['status']}: {c['reason']}" for c in missing))
    if result["goals"]:
        lines = ["| goal | compared | ratio | target | result |", "|---|---|---|---|---|"]
        for g in result["goals"]:
            verdict = "-" if g["met"] is None else "met" if g["met"] else "missed"
            lines.append(f"| {g['name']} | {g['compared']} | {_or_dash(g['ratio'], '{:.2f}x')} | {g['op']} "
                         f"{g['target']}x | {verdict}{' (' + g['note'] + ')' if g['note'] else ''} |")
        parts.append("goals (ratios of cells of this run)\n" + "\n".join(lines))
    return "\n\n".join(parts)


def _grid(result: dict, methods: list[str], contexts: list[int], show) -> str:
    lines = ["| method | " + " | ".join(format_length(c) for c in contexts) + " |", "|---" * (len(contexts) + 1) + "|"]
    for method in methods:
        row = [show(cell) if (cell := _ok(result, method, c)) else "-" for c in contexts]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _or_dash(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)

