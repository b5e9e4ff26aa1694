"""RULER's needle tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?") in natural prose: needles, questions, prompts built to a length in tokens, and their per-needle scorer."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvtier.tools.corpus import TokenizedCorpus
from kvtier.tools.haystack import TAIL_SENTENCES, assemble, sentence_cut

# niah_single: one needle, asked. multikey: `needles` keys, one asked (the others are distractors). multivalue:
# `needles` values of one key, all asked. multiquery: `needles` keys, all asked in one question.
TASKS = ("niah_single", "multikey", "multivalue", "multiquery")
# RULER's template, in plain text (no chat template: see kvtier.tools.haystack), pieces joined by spaces.
INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the numbers afterwards.")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = ("What is the special magic number for {keys} mentioned in the provided text? "
            "The special magic number for {keys} mentioned in the provided text is")
QUESTION_ALL = ("What are all the special magic numbers for {keys} mentioned in the provided text? "
                "The special magic numbers for {keys} mentioned in the provided text are")
# The needles' keys: cities the corpus never names (scripts/build_corpus.py drops every sentence naming one), so a
# key appears in its needles and in the question only.
CITIES = ("Lisbon", "Nairobi", "Kyoto", "Oslo", "Lima", "Hanoi", "Bogota", "Dakar", "Quito", "Tbilisi", "Riga",
          "Tallinn", "Accra", "Manila", "Havana", "Montevideo", "Reykjavik", "Helsinki", "Warsaw", "Prague", "Vienna",
          "Budapest", "Zagreb", "Athens", "Cairo", "Casablanca", "Tunis", "Beirut", "Amman", "Karachi", "Mumbai",
          "Chennai", "Dhaka", "Kathmandu", "Colombo", "Bangkok", "Jakarta", "Seoul", "Osaka", "Taipei", "Melbourne",
          "Auckland", "Toronto", "Montreal", "Dublin", "Edinburgh", "Madrid", "Seville", "Porto", "Milan", "Naples",
          "Munich", "Hamburg", "Zurich", "Geneva", "Brussels", "Copenhagen", "Stockholm")
# Sentences tried as the haystack's first for whole sentences of exactly the tokens a prompt has left: one in about
# as many as a sentence has tokens fits (~18 of SmolLM2's, ~85 bytes), so a miss is rare but for haystacks shorter
# than a few sentences.
EXACT_FIT_TRIES = 4096
# Answer tokens per asked needle: " 1234567." is 9 of SmolLM2's tokens (one per digit), with room for a few words.
ANSWER_TOKENS_PER_NEEDLE = 16


@dataclass(frozen=True)
class Needle:
    key: str      # a city
    value: str    # 7 digits, unlike every other needle's of the prompt
    asked: bool   # False: a multikey distractor
    depth: float  # requested: the fraction of the haystack's tokens before it


@dataclass(frozen=True)
class NeedleSample:
    """One prompt of a RULER task: `ids` end with the question and the answer's first words; the answer should hold
    the value of every asked needle."""

    ids: list[int]
    task: str
    depth: float          # requested: where the asked needles sit
    length: int           # len(ids): the requested length (within half a sentence where no whole sentences fit)
    needles: tuple[Needle, ...]                  # the asked ones first, in the question's order
    needle_spans: tuple[tuple[int, int], ...]    # [start, end) in ids of each needle, in `needles`' order
    corpus_start: int     # the corpus sentence the haystack starts with
    corpus_sentences: int  # corpus sentences in the haystack; more than the corpus holds: some repeat

    @property
    def asked(self) -> tuple[Needle, ...]:
        return tuple(needle for needle in self.needles if needle.asked)

    @property
    def key(self) -> str:
        """The asked values, comma-separated: what the answer must hold (a sample's identity in results.json)."""
        return ",".join(needle.value for needle in self.asked)


def needle_count(task: str, needles: int) -> int:
    """How many needles a prompt of `task` holds: one for niah_single, `needles` (2 or more) for the others;
    ValueError for an unknown task or a count out of range."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if task == "niah_single":
        return 1
    if not 2 <= needles <= len(CITIES):
        raise ValueError(f"{task} needs 2 to {len(CITIES)} needles, got {needles}")
    return needles


def answer_tokens(task: str, needles: int) -> int:
    """The answer length a task needs: ANSWER_TOKENS_PER_NEEDLE per asked needle."""
    asked = 1 if task in ("niah_single", "multikey") else needles
    return ANSWER_TOKENS_PER_NEEDLE * asked


def draw_needles(task: str, needles: int, draw: str) -> tuple[Needle, ...]:
    """The needles of a prompt (depths not yet set): distinct cities and distinct 7-digit values, the same for the
    same task, count and `draw` in every run."""
    count = needle_count(task, needles)
    rng = random.Random(f"needles:{task}:{count}:{draw}")  # a str seed: hashed with SHA-512, not PYTHONHASHSEED
    cities = rng.sample(CITIES, 1 if task == "multivalue" else count) * (count if task == "multivalue" else 1)
    values = [str(value) for value in rng.sample(range(1_000_000, 10_000_000), count)]
    return tuple(Needle(key=city, value=value, asked=task != "multikey" or index == 0, depth=0.0)
                 for index, (city, value) in enumerate(zip(cities, values)))


def question(task: str, needles: tuple[Needle, ...]) -> str:
    """The question and the answer's first words, naming the asked keys ("A, B and C")."""
    keys = list(dict.fromkeys(needle.key for needle in needles if needle.asked))
    named = keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} and {keys[-1]}"
    return (QUESTION if task in ("niah_single", "multikey") else QUESTION_ALL).format(keys=named)


def build_task_sample(corpus: TokenizedCorpus, length: int, depth: float, task: str = "niah_single",
                      needles: int = 4, draw: str = "0") -> NeedleSample:
    """INSTRUCTION, the corpus with the task's needles, the question and the answer's first words: exactly `length`
    tokens, so the prompts of one length can share a batch. The haystack is whole corpus sentences, in corpus order
    (going round it if it must), from the first sentence at or after one `draw` picks from which whole sentences add
    up to exactly the tokens left; where none does (among EXACT_FIT_TRIES), from the picked one, as close as whole
    sentences come (within half a sentence). `draw` (e.g. "seed:length:depth:index") also picks the cities and
    values.

    The asked needles go in at the sentence boundary closest to `depth` of the haystack's tokens and the boundaries
    after it, one corpus sentence apart; multikey's distractors are spread evenly through the haystack. At least
    TAIL_SENTENCES of prose follow every needle (so depth 1 sits that far before the question).

    Pieces are tokenized separately, each after a space (kvtier.tools.haystack.build_sample says why that gives the
    ids of the whole text)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction between 0 and 1, got {depth}")
    drawn = draw_needles(task, needles, draw)
    asked = sum(needle.asked for needle in drawn)
    distractors = len(drawn) - asked  # the needles after the asked ones
    drawn = tuple(Needle(n.key, n.value, n.asked, depth if n.asked else (index - asked + 0.5) / distractors)
                  for index, n in enumerate(drawn))
    encoded = [corpus.encode(" " + NEEDLE.format(key=needle.key, value=needle.value)) for needle in drawn]
    head, tail = corpus.encode(INSTRUCTION), corpus.encode(" " + question(task, drawn))
    budget = length - len(head) - sum(map(len, encoded)) - len(tail)
    if budget < 0:
        raise ValueError(f"a {task} prompt needs at least {length - budget} tokens, asked for {length}")
    start = random.Random(f"start:{task}:{len(drawn)}:{draw}").randrange(len(corpus))
    start, end = _span_of_sentences(corpus, start, budget)
    haystack = [corpus.sentences[index % len(corpus)] for index in range(start, end)]
    deepest = max(len(haystack) - TAIL_SENTENCES - (asked - 1), 0)  # the last asked needle too leaves the tail
    first = min(sentence_cut(haystack, depth), deepest)
    places, rank = [], 0
    for needle in drawn:
        if needle.asked:
            places.append((min(first + rank, len(haystack)), needle.depth))
            rank += 1
        else:
            places.append((min(sentence_cut(haystack, needle.depth), max(len(haystack) - TAIL_SENTENCES, 0)),
                           needle.depth))
    ids, spans = assemble(head, haystack, encoded, places, tail)
    return NeedleSample(ids=ids, task=task, depth=depth, length=len(ids), needles=drawn, needle_spans=tuple(spans),
                        corpus_start=start % len(corpus), corpus_sentences=len(haystack))


def _span_of_sentences(corpus: TokenizedCorpus, start: int, budget: int) -> tuple[int, int]:
    """(first, end): ring indices of the corpus sentences [first, end) that hold exactly `budget` tokens, `first` the
    nearest at or after `start` that has such an end; where none of EXACT_FIT_TRIES has one, from `start`, the end
    whose total is the closest to `budget` (the shorter on a tie)."""
    def tokens_before(index: int) -> int:  # tokens of the ring's sentences [0, index)
        rounds, within = divmod(index, len(corpus))
        return rounds * corpus.tokens + corpus.cumulative[within]

    def end_reaching(first: int) -> int:  # the first end whose sentences hold at least `budget` tokens
        low, high = first, first + budget  # every sentence holds a token at least
        while low < high:
            middle = (low + high) // 2
            low, high = (middle + 1, high) if tokens_before(middle) - tokens_before(first) < budget else (low, middle)
        return low

    for first in range(start, start + min(EXACT_FIT_TRIES, len(corpus))):
        end = end_reaching(first)
        if tokens_before(end) - tokens_before(first) == budget:
            return first, end
    end = end_reaching(start)  # holds `budget` tokens or more; end - 1 holds fewer
    over = tokens_before(end) - tokens_before(start) - budget
    under = budget - (tokens_before(end - 1) - tokens_before(start)) if end > start else over
    return start, (end if over < under else end - 1)


def score(sample: NeedleSample, answer: str) -> dict[str, Any]:
    """RULER's string match, per needle: an asked needle is found when its value appears in the answer. Returns the
    record fields: found and asked counts, hit (all found), each needle with found, and for multikey whether the
    answer gave a distractor's value instead (took_distractor)."""
    needles = [{"key": n.key, "value": n.value, "asked": n.asked, "depth": n.depth, "found": n.value in answer}
               for n in sample.needles]
    found = sum(needle["found"] for needle in needles if needle["asked"])
    record = {"found": found, "asked": len(sample.asked), "hit": found == len(sample.asked), "needles": needles}
    if sample.task == "multikey":
        record["took_distractor"] = any(needle["found"] for needle in needles if not needle["asked"])
    return record
