"""Reports of needle-in-a-haystack runs (the dicts `kvtier.tools.niah.run_niah` returns): tables, heatmaps, JSON."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from kvtier.tools.args import format_length
from kvtier.tools.output import write_json
from kvtier.tools.plots import pyplot, save_figure

# What older results.json files lack, with the value their runs had: no --distractors, one prompt per forward, no
# "complete" key (only files written whole, at the end of a sweep, existed then), and the filler passkey, the only
# task then (its needles: the asked one and the distractors, added in `_with_older_defaults`).
_OLDER_DEFAULTS = {"distractors": 0, "batch": 1, "complete": True, "haystack": "filler", "task": "passkey",
                   "corpus": None}
# A run's setup: parts of one label merge only when all of these are equal.
_SETUP_FIELDS = ("config", "haystack", "task", "distractors", "needles", "corpus", "seed", "max_new_tokens", "keys")
_RUN_FIELDS = {"label", "lengths", "depths", "samples"}


def accuracy_grid(run: dict[str, Any]) -> list[list[tuple[int, int]]]:
    """(needles found, needles asked) per cell: one row per length, one column per depth, in the run's order. A
    passkey sample asks for one needle (its key)."""
    counts = {(length, depth): [0, 0] for length in run["lengths"] for depth in run["depths"]}
    for sample in run["samples"]:
        cell = counts[(sample["length"], sample["depth"])]
        cell[0] += sample.get("found", bool(sample["hit"]))
        cell[1] += sample.get("asked", 1)
    return [[tuple(counts[(length, depth)]) for depth in run["depths"]] for length in run["lengths"]]


def format_table(run: dict[str, Any]) -> str:
    """Needles found per length (rows) and depth (columns), with each row's total and the overall total, under the
    run's label and task."""
    grid = accuracy_grid(run)
    header = ["length"] + [f"{depth:g}" for depth in run["depths"]] + ["all"]
    rows = [[format_length(length)] + [_fraction(*cell) for cell in cells] + [_fraction(*_total(cells))]
            for length, cells in zip(run["lengths"], grid)]
    per_depth = [_total(list(column)) for column in zip(*grid)]
    overall = _total([cell for cells in grid for cell in cells])
    rows.append(["all"] + [_fraction(*cell) for cell in per_depth] + [_fraction(*overall)])
    return f"{run['label']}: {task_title(run)}\n" + _render(header, rows)


def format_comparison(runs: list[dict[str, Any]]) -> str:
    """One row per (method, length): needles found per depth, in total, and the mean prefill and decode seconds.
    The columns are every run's depths, sorted ('-' where a run has none: merged runs may differ).

    The seconds are the samples' records: with `run_niah(batch=N)` each record holds its whole batch's seconds
    (the rows ran in one forward), so the means are per batch, not per prompt."""
    depths = sorted({depth for run in runs for depth in run["depths"]})
    header = ["method", "length"] + [f"{depth:g}" for depth in depths] + ["all", "prefill s", "decode s"]
    rows = []
    for run in runs:
        for length, cells in zip(run["lengths"], accuracy_grid(run)):
            by_depth = dict(zip(run["depths"], cells))
            timed = [s for s in run["samples"] if s["length"] == length]
            rows.append([run["label"], format_length(length)] + [_fraction(*by_depth.get(d, (0, 0))) for d in depths]
                        + [_fraction(*_total(cells)), _mean(timed, "prefill_s"), _mean(timed, "decode_s")])
    return _render(header, rows)


def plot_heatmap(run: dict[str, Any], path: str | Path) -> Path:
    """The ReAttention paper's figure: accuracy over length (x) and needle depth (y), red 0 to green 1. Each cell
    reads needles found/asked (a merged run's cells may hold different counts); a cell without prompts is grey,
    '-'."""
    by_depth = list(zip(*accuracy_grid(run)))  # [depth][length] -> (found, asked), depth down the y axis
    hits, count = _total([cell for row in by_depth for cell in row])
    title = f"{task_title(run)}, {hits}/{count} found\n{run['label']}"
    return _plot_grid(by_depth, [format_length(length) for length in run["lengths"]], run["depths"],
                      "context length (tokens)", title, path)


def plot_methods(runs: list[dict[str, Any]], length: int, path: str | Path) -> Path:
    """The methods side by side at one length: accuracy over method (x) and needle depth (y), for runs of one task
    (e.g. `--policy all`); depths a run lacks are grey."""
    depths = sorted({depth for run in runs for depth in run["depths"]})
    columns = []  # [method][depth] -> (found, asked)
    for run in runs:
        by_depth = dict(zip(run["depths"], accuracy_grid(run)[run["lengths"].index(length)]))
        columns.append([by_depth.get(depth, (0, 0)) for depth in depths])
    policies = [run["label"].split(" ")[0] for run in runs]
    scopes = {run["label"].split(" ", 1)[1] for run in runs if " " in run["label"]}  # stock's label has none
    shared = len(scopes) == 1 and len(set(policies)) == len(runs)  # one scope: name the columns by policy alone
    labels = policies if shared else [run["label"] for run in runs]
    title = f"{task_title(runs[0])} at {format_length(length)} tokens, by method"
    title += f"\n{scopes.pop()}" if shared else ""
    return _plot_grid([list(row) for row in zip(*columns)], labels, depths, "method", title, path)


def task_title(run: dict[str, Any]) -> str:
    """What a run measured, in words: the filler passkey (with distractors) or a RULER task in natural text."""
    run = _with_older_defaults(run)
    if run["task"] == "passkey":
        return f"passkey among {run['distractors']} distractors" if run["distractors"] else "passkey retrieval"
    count = run["needles"]
    needles = {"niah_single": "one needle", "multikey": f"1 of {count} keys asked",
               "multivalue": f"{count} values of one key", "multiquery": f"{count} keys asked at once"}
    return f"{run['task']} ({needles.get(run['task'], f'{count} needles')}) in natural text"


def _with_older_defaults(run: dict[str, Any]) -> dict[str, Any]:
    """`run` with the fields older results.json files lack (_OLDER_DEFAULTS; a filler run's needles)."""
    run = {**_OLDER_DEFAULTS, **run}
    run.setdefault("needles", 1 + run["distractors"])
    return run


def _plot_grid(by_depth: list[list[tuple[int, int]]], columns: list[str], depths: list[float], xlabel: str,
               title: str, path: str | Path) -> Path:
    """A red (0) to green (1) accuracy grid, by_depth[depth][column] = (found, asked), written to `path`."""
    plt = pyplot()
    accuracy = [[hits / count if count else float("nan") for hits, count in row] for row in by_depth]
    colors = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")  # NaN: a cell without prompts
    # wide enough for the title even with one or two columns
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + 1.1 * len(columns)), 1.4 + 0.5 * len(depths)))
    image = ax.imshow(accuracy, cmap=colors, vmin=0.0, vmax=1.0, aspect="auto")
    for y, row in enumerate(by_depth):
        for x, (hits, count) in enumerate(row):
            dark = count and abs(hits / count - 0.5) > 0.3  # the colormap's ends are dark: write in white there
            ax.text(x, y, _fraction(hits, count), ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(depths)), [f"{depth:.0%}" for depth in depths])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    return save_figure(fig, path)


def write_report(runs: list[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any] | None = None) -> list[Path]:
    """results.json (`meta` and every run), one heatmap PNG per run and, for a length that several runs of one task
    share (e.g. `--policy all`), the methods side by side (niah-methods-<length>.png) into `out_dir`; returns the
    paths written."""
    out_dir = Path(out_dir)
    results = write_results(runs, out_dir, meta)
    paths = [results] + [plot_heatmap(run, out_dir / f"niah-{_slug(run['label'])}.png") for run in runs]
    for (length, suffix), sharing in _runs_by_length(runs).items():
        if len(sharing) > 1:
            paths.append(plot_methods(sharing, length, out_dir / f"niah-methods-{format_length(length)}{suffix}.png"))
    return paths


def _runs_by_length(runs: list[dict[str, Any]]) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """(length, the task's file name suffix) -> the runs that hold prompts of that length and task, in the runs'
    order. The suffix: none for the plain passkey, -d<distractors> for the passkey among distractors, -<task> or
    -<task><needles> for natural text."""
    sharing: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for run in runs:
        full = _with_older_defaults(run)
        if full["task"] == "passkey":
            suffix = f"-d{full['distractors']}" if full["distractors"] else ""
        else:
            suffix = f"-{full['task']}" + (f"{full['needles']}" if full["task"] != "niah_single" else "")
        for length in run["lengths"]:
            if any(sample["length"] == length for sample in run["samples"]):
                sharing.setdefault((length, suffix), []).append(run)
    return sharing


def write_results(runs: list[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """`out_dir`/results.json (`meta` and every run), replaced whole: written beside it, then renamed over it, so a
    run killed mid-write leaves the previous version, never half a file."""
    return write_json(Path(out_dir) / "results.json", {**(meta or {}), "runs": runs}, indent=2)


def load_results(paths: Sequence[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """results.json files (or folders holding one) -> (path, contents) pairs, for `merge_runs`; ValueError naming
    the path that is missing, not JSON, or not a `kvtier niah` results.json."""
    files = []
    for path in paths:
        path = path / "results.json" if path.is_dir() else path
        try:
            doc = json.loads(path.read_text())
        except OSError as err:
            raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
        except ValueError as err:  # not JSON, or not text
            raise ValueError(f"{path} is not JSON: {err}") from None
        runs = doc.get("runs") if isinstance(doc, dict) else None
        if not isinstance(runs, list) or not all(isinstance(run, dict) and _RUN_FIELDS <= set(run) for run in runs):
            raise ValueError(f"{path} is not a `kvtier niah` results.json: it needs a \"runs\" list of runs with "
                             f"{', '.join(sorted(_RUN_FIELDS))}")
        files.append((path, doc))
    return files


def merge_runs(files_contents: Sequence[tuple[str | Path, dict[str, Any]]]) -> tuple[list[dict[str, Any]],
                                                                                     dict[str, Any]]:
    """Earlier sweeps' results (path, results.json contents) -> (runs, meta): one run per label, in order of first
    appearance. A label's parts must share their setup (config, haystack, task, distractors, needles, corpus, seed,
    max_new_tokens, keys); its
    lengths and depths are the sorted unions, its samples all parts' samples by (length, depth, order of appearance),
    its "batch" the list of the parts' batch sizes, "complete" only if every part was. A sample (length, depth, key)
    in two files is a ValueError, as is a setup that differs: merging would count it twice or mix setups.

    meta: "merged_from" (each file's path, command, finished, device and versions), and "model", "device" and
    "dtype": the files' value, or the list of their values where they differ."""
    merged: dict[str, dict[str, Any]] = {}
    first_part: dict[str, tuple[str | Path, dict[str, Any]]] = {}
    sample_file: dict[str, dict[tuple[int, float, str], str | Path]] = {}
    for path, doc in files_contents:
        for part in doc["runs"]:
            part, label = _with_older_defaults(part), part["label"]
            if label not in merged:
                first_part[label], sample_file[label] = (path, part), {}
                merged[label] = {**part, "lengths": [], "depths": [], "samples": [], "batch": [], "complete": True}
            first_path, first = first_part[label]
            for field in _SETUP_FIELDS:
                if _setup_value(part, field) != _setup_value(first, field):
                    raise ValueError(f"cannot merge run {label!r}: its {field} is {_setup_value(first, field)!r} in "
                                     f"{first_path} but {_setup_value(part, field)!r} in {path}")
            seen, identities = sample_file[label], [(s["length"], s["depth"], s["key"]) for s in part["samples"]]
            twice = next((identity for identity in identities if identity in seen), None)
            if twice is not None:
                length, depth, key = twice
                raise ValueError(f"cannot merge run {label!r}: the sample of length {length}, depth {depth:g}, key "
                                 f"{key} is in {seen[twice]} and in {path} (it would count twice)")
            seen.update(dict.fromkeys(identities, path))
            run = merged[label]
            run["lengths"] = sorted({*run["lengths"], *part["lengths"]})
            run["depths"] = sorted({*run["depths"], *part["depths"]})
            run["samples"] += part["samples"]
            batches = part["batch"] if isinstance(part["batch"], list) else [part["batch"]]  # a merged file's list
            run["batch"] += [size for size in batches if size not in run["batch"]]
            run["complete"] = run["complete"] and part["complete"]
    for run in merged.values():
        run["samples"].sort(key=lambda sample: (sample["length"], sample["depth"]))  # stable: keeps appearance order
    docs = [doc for _, doc in files_contents]
    meta = {key: _shared([doc.get(key) for doc in docs]) for key in ("model", "device", "dtype")}
    sources = ("command", "finished", "device", "versions")
    meta["merged_from"] = [{"path": str(path), **{key: doc.get(key) for key in sources}}
                           for path, doc in files_contents]
    return list(merged.values()), meta


def _setup_value(run: dict[str, Any], field: str) -> Any:
    """What must be equal for runs to merge: the field, or of the corpus its sha256 (its length in tokens is the
    tokenizer's, and the same file gives the same prompts)."""
    value = run.get(field)
    return value.get("sha256") if field == "corpus" and isinstance(value, dict) else value


def _shared(values: list[Any]) -> Any:
    """The value all files share, else the list of their distinct values (a merged file's may be a list)."""
    distinct = [value for index, value in enumerate(values) if value not in values[:index]]
    return distinct[0] if len(distinct) == 1 else distinct


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")


def _total(cells: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(hits for hits, _ in cells), sum(count for _, count in cells)


def _fraction(hits: int, count: int) -> str:
    return f"{hits}/{count}" if count else "-"


def _mean(samples: list[dict[str, Any]], key: str) -> str:
    return f"{sum(s[key] for s in samples) / len(samples):.1f}" if samples else "-"


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [header, ["-" * width for width in widths]] + rows
    # The first column names the row (a method or a length): left-aligned; counts and seconds right-aligned.
    return "\n".join("  ".join([str(line[0]).ljust(widths[0])] + [str(cell).rjust(width) for cell, width
                                                                    in zip(line[1:], widths[1:])]) for line in lines)
