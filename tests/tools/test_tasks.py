"""RULER's needle tasks in natural text (kvtier.tools.tasks), scored per needle, in the sweep, the report and the
command line; and the filler passkey, which keeps today's prompts."""
from __future__ import annotations

import hashlib
import json
import re

import pytest

from kvtier.tools.cli import main
from kvtier.tools.corpus import CORPUS_SHA256, corpus_sentences, tokenized_corpus
from kvtier.tools.haystack import NEEDLE as PASSKEY_NEEDLE, TAIL_SENTENCES, build_sample, draw_key
from kvtier.tools.model import ByteTokenizer
from kvtier.tools.niah import BatchAnswer, Method, run_niah, sweep_task
from kvtier.tools.niah_report import accuracy_grid, format_table, merge_runs, task_title, write_report
from kvtier.tools.tasks import (
    ANSWER_TOKENS_PER_NEEDLE, CITIES, INSTRUCTION, NEEDLE, QUESTION, QUESTION_ALL, TASKS, build_task_sample, score,
)
from tests.conftest import tiny_model

TOKENIZER = ByteTokenizer()  # one token per byte: token counts are character counts
LONGEST = max(len(sentence) for sentence in corpus_sentences()) + 1  # tokens of the longest " sentence"


@pytest.fixture(scope="module")
def ring():
    return tokenized_corpus(TOKENIZER)


def _text(ids) -> str:
    return TOKENIZER.decode(list(ids))


def _haystack(sample) -> list[str]:
    """The corpus sentences of the sample's haystack, in order."""
    sentences = corpus_sentences()
    return [sentences[(sample.corpus_start + i) % len(sentences)] for i in range(sample.corpus_sentences)]


def _tail(sample) -> str:
    return " " + (QUESTION if sample.task in ("niah_single", "multikey") else QUESTION_ALL).format(
        keys=_named([n.key for n in sample.asked]))


def _named(keys: list[str]) -> str:
    keys = list(dict.fromkeys(keys))
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


# ---- prompts --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1500, 4096, 30000])
def test_prompts_hold_exactly_the_requested_tokens_in_whole_sentences(ring, task, length):
    samples = [build_task_sample(ring, length, 0.5, task, 3, draw=f"{length}:{index}") for index in range(3)]
    assert [(sample.length, len(sample.ids)) for sample in samples] == [(length, length)] * 3


def test_a_haystack_too_short_for_an_exact_fit_comes_within_half_a_sentence(ring):
    for length in range(600, 640):  # a sentence or two: whole sentences of exactly the tokens left are rare
        sample = build_task_sample(ring, length, 0.5, draw=f"{length}")
        assert abs(sample.length - length) <= LONGEST // 2 + 1


@pytest.mark.parametrize("task", TASKS)
def test_needle_spans_hold_exactly_each_needles_tokens_and_the_rest_is_the_corpus_in_order(ring, task):
    sample = build_task_sample(ring, 6000, 0.4, task, 4, draw="spans")
    assert len(sample.needle_spans) == len(sample.needles) == (1 if task == "niah_single" else 4)
    for (start, end), needle in zip(sample.needle_spans, sample.needles):
        assert _text(sample.ids[start:end]) == " " + NEEDLE.format(key=needle.key, value=needle.value)
    cut, kept = 0, []
    for start, end in sorted(sample.needle_spans):
        kept += sample.ids[cut:start]
        cut = end
    kept += sample.ids[cut:]
    # with the needles taken out: the instruction, the haystack's sentences in corpus order, the question
    assert _text(kept) == INSTRUCTION + "".join(" " + s for s in _haystack(sample)) + _tail(sample)


@pytest.mark.parametrize("task", ["niah_single", "multivalue", "multiquery"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_asked_needles_sit_at_the_requested_depth_one_sentence_apart(ring, task, depth):
    sample = build_task_sample(ring, 8000, depth, task, 3, draw="depth")
    spans = [span for span, needle in zip(sample.needle_spans, sample.needles) if needle.asked]
    head = len(TOKENIZER(INSTRUCTION)["input_ids"])
    prose = sample.length - head - sum(end - start for start, end in sample.needle_spans) - len(_tail(sample))
    before = spans[0][0] - head  # all prose: the asked needles come first
    deepest = prose - (TAIL_SENTENCES + len(spans) - 1) * LONGEST
    assert min(depth * prose, deepest) - LONGEST <= before <= depth * prose + LONGEST
    sentences = set(_haystack(sample))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        between = _text(sample.ids[end:start])
        assert between[:1] == " " and between[1:] in sentences  # exactly one corpus sentence


@pytest.mark.parametrize("task", TASKS)
def test_every_needle_leaves_the_tail_of_prose_before_the_question(ring, task):
    sample = build_task_sample(ring, 5000, 1.0, task, 4, draw="tail")
    last = max(end for _, end in sample.needle_spans)
    after = _text(sample.ids[last:]).removesuffix(_tail(sample))
    tail = _haystack(sample)[-TAIL_SENTENCES:]
    assert after.endswith("".join(" " + sentence for sentence in tail))


def test_multikey_asks_for_one_key_among_distractors_spread_through_the_text(ring):
    sample = build_task_sample(ring, 8000, 0.2, "multikey", 4, draw="multikey")
    asked, *distractors = sample.needles
    assert asked.asked and not any(needle.asked for needle in distractors) and sample.key == asked.value
    assert [needle.depth for needle in distractors] == [0.5 / 3, 1.5 / 3, 2.5 / 3]
    assert len({needle.key for needle in sample.needles}) == 4 and len({n.value for n in sample.needles}) == 4
    text = _text(sample.ids)
    assert text.endswith(f"The special magic number for {asked.key} mentioned in the provided text is")
    for needle in distractors:
        assert text.count(needle.key) == 1 and text.count(needle.value) == 1  # only in its needle
    assert text.count(asked.key) == 3  # its needle, the question and the answer's first words


def test_multivalue_hides_several_values_of_one_key_and_multiquery_asks_several_keys(ring):
    values = build_task_sample(ring, 6000, 0.5, "multivalue", 4, draw="v")
    assert len({n.key for n in values.needles}) == 1 and len({n.value for n in values.needles}) == 4
    assert all(n.asked for n in values.needles) and values.key == ",".join(n.value for n in values.needles)
    assert _text(values.ids).endswith(f"magic numbers for {values.needles[0].key} mentioned in the provided text are")
    queries = build_task_sample(ring, 6000, 0.5, "multiquery", 4, draw="q")
    keys = [n.key for n in queries.needles]
    assert len(set(keys)) == 4 and all(key in CITIES for key in keys)
    assert f"What are all the special magic numbers for {keys[0]}, {keys[1]}, {keys[2]} and {keys[3]} " \
           f"mentioned in the provided text?" in _text(queries.ids)


def test_the_same_draw_gives_the_same_prompt_and_other_draws_other_text_and_needles(ring):
    first = build_task_sample(ring, 3000, 0.5, "multiquery", 3, draw="0:3000:0.5:0")
    assert build_task_sample(ring, 3000, 0.5, "multiquery", 3, draw="0:3000:0.5:0") == first
    others = [build_task_sample(ring, 3000, 0.5, "multiquery", 3, draw=f"0:3000:0.5:{i}") for i in range(1, 6)]
    assert len({sample.corpus_start for sample in [first, *others]}) == 6
    assert len({sample.key for sample in [first, *others]}) == 6
    assert all(re.fullmatch(r"[1-9]\d{6}", needle.value) for s in others for needle in s.needles)


@pytest.mark.parametrize("call, problem", [
    (dict(depth=1.5), "between 0 and 1"), (dict(length=300), "needs at least"), (dict(task="niah"), "unknown task"),
    (dict(task="multikey", needles=1), "multikey needs 2 to"), (dict(task="multiquery", needles=len(CITIES) + 1),
                                                                "multiquery needs 2 to")])
def test_bad_prompt_arguments_are_refused_naming_the_problem(ring, call, problem):
    arguments = dict(length=3000, depth=0.5, task="niah_single", needles=4) | call
    with pytest.raises(ValueError, match=problem):
        build_task_sample(ring, draw="x", **arguments)


# ---- scoring --------------------------------------------------------------------------------------------------------
def test_niah_single_finds_or_misses_its_one_needle(ring):
    sample = build_task_sample(ring, 2000, 0.5, draw="s")
    value = sample.needles[0].value
    assert score(sample, f" {value}.") | {"needles": None} == {"found": 1, "asked": 1, "hit": True, "needles": None}
    assert score(sample, f" {value[:-1]}.")["found"] == 0


def test_multikey_records_an_answer_that_took_a_distractor(ring):
    sample = build_task_sample(ring, 3000, 0.5, "multikey", 3, draw="k")
    asked, distractor, _ = sample.needles
    took = score(sample, f" {distractor.value}.")
    assert (took["found"], took["asked"], took["hit"], took["took_distractor"]) == (0, 1, False, True)
    assert [needle["found"] for needle in took["needles"]] == [False, True, False]
    right = score(sample, f" {asked.value}.")
    assert (right["found"], right["took_distractor"]) == (1, False)


@pytest.mark.parametrize("task", ["multivalue", "multiquery"])
def test_every_asked_needle_scores_on_its_own(ring, task):
    sample = build_task_sample(ring, 3000, 0.5, task, 4, draw="m")
    values = [needle.value for needle in sample.needles]
    partial = score(sample, f" {values[2]}, {values[0]} and 12345.")
    assert (partial["found"], partial["asked"], partial["hit"]) == (2, 4, False)
    assert [needle["found"] for needle in partial["needles"]] == [True, False, True, False]
    assert "took_distractor" not in partial
    assert score(sample, " " + ", ".join(values))["hit"]


# ---- the filler passkey keeps today's prompts -----------------------------------------------------------------------
@pytest.mark.parametrize("length, depth, distractors, needle_start, digest", [
    (1024, 0.1, 0, 214, "eddafe769ea75169"), (4096, 0.5, 0, 2073, "23d51e034decbd3b"),
    (4096, 1.0, 3, 3863, "e82ddab164e89eaf"), (5000, 0.0, 11, 146, "d53adcb616afc5a7"),
    (16384, 0.9, 2, 14618, "d895c6ab0d040238")])
def test_filler_prompts_are_the_ones_kvtier_measured_before_natural_text(length, depth, distractors, needle_start,
                                                                         digest):
    """The digests are of the prompts build_sample made before natural text came (commit a8bbd84)."""
    sample = build_sample(TOKENIZER, length, depth, draw_key(0, length, depth, 0), distractors)
    assert hashlib.sha256(json.dumps(sample.ids).encode()).hexdigest()[:16] == digest
    assert sample.needle_start == needle_start == sample.needle_spans[0][0]
    start, end = sample.needle_spans[0]
    assert len(sample.needle_spans) == 1 + distractors
    if not distractors:
        assert _text(sample.ids[start:end]) == " " + PASSKEY_NEEDLE.format(key=sample.key)
    for (start, end), key in zip(sample.needle_spans[1:], sample.distractor_keys):
        assert _text(sample.ids[start:end]).count(key) == 2  # "... is KEY. Remember it. KEY is the pass key ..."


# ---- the sweep ------------------------------------------------------------------------------------------------------
def _answering(monkeypatch, reply):
    """Replace the model's answers with reply(ids) (text), recording each prompt's ids."""
    prompts = []

    def fake_answer_batch(model, rows, cache, max_new_tokens, *args, **kwargs):
        prompts.extend(list(row) for row in rows)
        return BatchAnswer([TOKENIZER(reply(row))["input_ids"] for row in rows], 0.5, 0.25)

    monkeypatch.setattr("kvtier.tools.niah.answer_batch", fake_answer_batch)
    return prompts


def test_filler_sweep_runs_the_prompts_build_sample_makes(monkeypatch):
    prompts = _answering(monkeypatch, lambda ids: " 12345.")
    run = run_niah(tiny_model(), TOKENIZER, Method(), [600, 900], [0.2, 0.8], keys=2, haystack="filler",
                   distractors=1)
    expected = [build_sample(TOKENIZER, length, depth, draw_key(0, length, depth, index), 1)
                for length in (600, 900) for depth in (0.2, 0.8) for index in range(2)]
    assert prompts == [sample.ids for sample in expected]
    assert [s["needle_spans"] for s in run["samples"]] == [[list(span) for span in e.needle_spans] for e in expected]
    assert (run["haystack"], run["task"], run["needles"], run["max_new_tokens"]) == ("filler", "passkey", 2, 10)
    assert "corpus" not in run and all("found" not in s for s in run["samples"])


def test_natural_sweep_scores_every_needle_and_records_the_corpus(monkeypatch):
    first_value = lambda ids: " " + re.search(r"numbers for \w+ is: (\d{7})\.", _text(ids)).group(1) + "."
    _answering(monkeypatch, first_value)  # the answer gives the first needle's value only
    run = run_niah(tiny_model(), TOKENIZER, Method(), [2000], [0.1, 0.9], keys=2, task="multivalue", needles=3)
    assert (run["haystack"], run["task"], run["needles"], run["distractors"]) == ("natural", "multivalue", 3, 0)
    assert run["corpus"]["sha256"] == CORPUS_SHA256 and run["corpus"]["tokens"] == run["corpus"]["chars"]
    assert run["max_new_tokens"] == 3 * ANSWER_TOKENS_PER_NEEDLE
    for sample in run["samples"]:
        assert (sample["found"], sample["asked"], sample["hit"]) == (1, 3, False)
        assert [needle["found"] for needle in sample["needles"]] == [True, False, False]
        assert len(sample["needle_spans"]) == 3 and sample["repeats"] is False
    assert len({sample["corpus_start"] for sample in run["samples"]}) == 4  # each key its own text
    assert accuracy_grid(run) == [[(2, 6), (2, 6)]]
    assert format_table(run).splitlines()[-1].split() == ["all", "2/6", "2/6", "4/12"]


def test_sweep_task_refuses_what_does_not_exist():
    assert sweep_task("natural") == {"haystack": "natural", "task": "niah_single", "needles": 1, "distractors": 0}
    assert sweep_task("natural", "multikey", 5)["needles"] == 5
    assert sweep_task("filler", distractors=2) == {"haystack": "filler", "task": "passkey", "needles": 3,
                                                   "distractors": 2}
    for call, problem in [(("filler", "multikey"), "one task, the passkey"), (("natural", None, 4, 2), "multikey"),
                          (("essays",), "unknown haystack")]:
        with pytest.raises(ValueError, match=problem):
            sweep_task(*call)


# ---- the command line -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, problem", [
    (["--distractors", "2"], "add --haystack filler, or for distractors in natural text run --task multikey"),
    (["--haystack", "filler", "--task", "multikey"], "--haystack filler runs the passkey"),
    (["--haystack", "filler", "--needles", "3"], "--haystack filler runs the passkey"),
    (["--needles", "3"], "niah_single hides one needle"),
    (["--task", "multikey", "--needles", "1"], "--needles: multikey needs 2 to 58 needles, got 1")])
def test_niah_options_that_do_not_combine_are_errors_before_the_model_loads(options, problem, monkeypatch, capsys):
    monkeypatch.setattr("kvtier.tools.model.random_llama", lambda *_: pytest.fail("the model must not load"))
    assert main(["niah", "--quick", *options]) == 2
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err


def test_niah_help_names_the_haystacks_and_tasks(capsys):
    with pytest.raises(SystemExit):
        main(["niah", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--haystack {natural,filler}" in out and "{niah_single,multikey,multivalue,multiquery}" in out


# ---- reports --------------------------------------------------------------------------------------------------------
def _natural_run(label: str, task: str, needles: int, found: list[int], length: int = 8192, **fields) -> dict:
    asked = 1 if task in ("niah_single", "multikey") else needles
    samples = [{"length": length, "tokens": length - 2, "depth": 0.5, "key": f"{1000000 + i}", "hit": hits == asked,
                "found": hits, "asked": asked, "answer": "", "prefill_s": 1.0, "decode_s": 0.1}
               for i, hits in enumerate(found)]
    return {"label": label, "config": None, "lengths": [length], "depths": [0.5], "keys": len(found),
            "haystack": "natural", "task": task, "needles": needles, "distractors": 0,
            "corpus": {"name": "prose.txt.xz", "sha256": CORPUS_SHA256, "tokens": 842902}, "seed": 0,
            "max_new_tokens": 64, "batch": 1, "complete": True, "samples": samples, **fields}


def test_reports_count_needles_and_name_the_task(tmp_path):
    quest = _natural_run("quest G32 k63x32 W2048 C512", "multiquery", 4, [4, 2])
    stock = _natural_run("stock", "multiquery", 4, [1, 0])
    assert accuracy_grid(quest) == [[(6, 8)]]
    assert task_title(quest) == "multiquery (4 keys asked at once) in natural text"
    assert task_title({"label": "stock", "distractors": 2}) == "passkey among 2 distractors"  # an older file
    assert format_table(stock).splitlines()[0] == "stock: multiquery (4 keys asked at once) in natural text"
    paths = write_report([stock, quest], tmp_path)
    assert [p.name for p in paths][-1] == "niah-methods-8K-multiquery4.png"


def test_merging_refuses_runs_of_one_label_with_different_haystacks_or_tasks():
    natural = _natural_run("stock", "multikey", 4, [1])
    older = {"label": "stock", "config": None, "lengths": [8192], "depths": [0.1], "keys": 1, "seed": 0,
             "max_new_tokens": 64, "samples": [{"length": 8192, "tokens": 8192, "depth": 0.1, "key": "12345",
                                                "hit": True, "answer": "", "prefill_s": 1.0, "decode_s": 0.1}]}
    with pytest.raises(ValueError, match="its haystack is 'natural' in a.json but 'filler' in b.json"):
        merge_runs([("a.json", {"runs": [natural]}), ("b.json", {"runs": [older]})])
    with pytest.raises(ValueError, match="its task is 'multikey' in a.json but 'multivalue' in b.json"):
        merge_runs([("a.json", {"runs": [natural]}),
                    ("b.json", {"runs": [_natural_run("stock", "multivalue", 4, [1], depths=[0.9])]})])
    runs, _ = merge_runs([("a.json", {"runs": [natural]}),
                          ("b.json", {"runs": [_natural_run("stock", "multikey", 4, [0], length=16384)
                                               | {"corpus": {"sha256": CORPUS_SHA256, "tokens": 1}}]})])
    assert runs[0]["task"] == "multikey" and len(runs[0]["samples"]) == 2  # the corpus merges by its sha256
