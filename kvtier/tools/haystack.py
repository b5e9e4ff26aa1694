"""Passkey retrieval prompts (a needle in a haystack of filler), built to a length in tokens, and their scorer; the
token-level assembly every haystack shares (filling a token budget with sentences, needles at sentence boundaries)."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

# The classic passkey prompt (Landmark Attention, Mohtashami & Jaggi 2023). Plain text, no chat template:
# SmolLM2-135M-Instruct answers "a magical key that..." under its chat template even at 2K tokens, and reads the key
# back from the plain prompt (9/9 at 4K tokens, stock).
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
# The harder variant: several labelled keys in the haystack, one asked for (the others are distractors).
LABELLED_NEEDLE = "The pass key of the {label} box is {key}. Remember it. {key} is the pass key of the {label} box."
LABELLED_QUESTION = "What is the pass key of the {label} box? The pass key of the {label} box is"
# Filler sentences always left between a needle and the question: right against it, SmolLM2-135M-Instruct repeats
# "the pass key" instead of reading the key back, stock and inside its window (0/2 at 2K tokens with 0 or 1
# sentences; 2/2 with ~4, i.e. depth 0.99 of 2K). So depth 1 means "the last needle position before that tail".
TAIL_SENTENCES = 4
LABELS = ("blue", "red", "green", "yellow", "orange", "purple", "black", "white", "brown", "pink", "gray", "golden")


@dataclass(frozen=True)
class PasskeySample:
    """One prompt: `ids` end with the question, the answer should contain `key`."""

    ids: list[int]
    key: str
    depth: float          # requested: the fraction of the filler that comes before the needle
    length: int           # len(ids), within a few tokens of the requested length
    needle_start: int     # index in ids of the needle's first token
    distractor_keys: tuple[str, ...] = ()  # the other boxes' keys, when the prompt has distractors
    # [start, end) in ids of each needle: the asked-for one, then the distractors' in distractor_keys' order
    needle_spans: tuple[tuple[int, int], ...] = ()


def draw_key(seed: int, *labels: object) -> str:
    """A 5-digit key, the same for the same seed and labels (a sample's length, depth, index) in every run."""
    # A str seed is hashed with SHA-512, so it does not depend on PYTHONHASHSEED.
    return str(random.Random(f"{seed}:{':'.join(map(str, labels))}").randint(10000, 99999))


def build_sample(tokenizer, length: int, depth: float, key: str, distractors: int = 0) -> PasskeySample:
    """INSTRUCTION, filler with the needle at `depth`, QUESTION: `length` tokens, give or take half a sentence.
    At least TAIL_SENTENCES of filler follow every needle (so depth 1 sits that far before the question).

    With `distractors` > 0 the keys are labelled boxes: the asked-for box's needle at `depth`, and that many other
    boxes' needles (other keys) spread evenly through the filler; the question names the box.

    Pieces are tokenized separately, each after a space, which gives the same ids as tokenizing the whole text
    (the tokenizer splits before a space), so the token count is known without re-tokenizing 1M-token prompts."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction between 0 and 1, got {depth}")
    if not 0 <= distractors < len(LABELS):
        raise ValueError(f"distractors must be between 0 and {len(LABELS) - 1}, got {distractors}")
    encode = _encoder(tokenizer)
    labels = random.Random(f"labels:{key}").sample(LABELS, distractors + 1) if distractors else [None]
    keys = [key] + _distractor_keys(key, distractors)
    needles = [encode(" " + _needle(label, k)) for label, k in zip(labels, keys)]
    question = QUESTION if not distractors else LABELLED_QUESTION.format(label=labels[0])
    head, tail = encode(INSTRUCTION), encode(" " + question)
    sentences = [encode(" " + sentence) for sentence in FILLER]
    budget = length - len(head) - sum(map(len, needles)) - len(tail)
    if budget < 0:
        raise ValueError(f"a passkey prompt needs at least {length - budget} tokens, asked for {length}")
    filler = fill(itertools.cycle(sentences), budget)
    depths = [depth] + [(index + 0.5) / distractors for index in range(distractors)]
    deepest = max(len(filler) - TAIL_SENTENCES, 0)
    ids, spans = assemble(head, filler, needles, [(min(sentence_cut(filler, at), deepest), at) for at in depths], tail)
    return PasskeySample(ids=ids, key=key, depth=depth, length=len(ids), needle_start=spans[0][0],
                         distractor_keys=tuple(keys[1:]), needle_spans=tuple(spans))


def fill(sentences: Iterable[list[int]], budget: int) -> list[list[int]]:
    """The first of `sentences` (token ids each) whose total token count is the closest to `budget`."""
    filler, total = [], 0
    for sentence in sentences:
        if abs(total + len(sentence) - budget) >= abs(total - budget):
            break
        filler.append(sentence)
        total += len(sentence)
    return filler


def sentence_cut(filler: Sequence[list[int]], depth: float) -> int:
    """The filler sentence boundary closest to `depth` of the filler's tokens: the index of the sentence after it."""
    boundaries = [0]
    for sentence in filler:
        boundaries.append(boundaries[-1] + len(sentence))
    return min(range(len(boundaries)), key=lambda i: abs(boundaries[i] - depth * boundaries[-1]))


def assemble(head: list[int], filler: Sequence[list[int]], needles: Sequence[list[int]],
             places: Sequence[tuple[int, float]], tail: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, spans): `head`, the filler sentences with needle i just before sentence places[i][0] (needles at one
    boundary in the order of places[i][1], then i), then `tail`; spans[i] is needle i's [start, end) in ids."""
    ids, spans = list(head), [(0, 0)] * len(needles)
    order = sorted(range(len(needles)), key=lambda i: places[i])
    at = 0
    for position, sentence in enumerate([*filler, []]):
        while at < len(order) and places[order[at]][0] == position:
            spans[order[at]] = (len(ids), len(ids) + len(needles[order[at]]))
            ids += needles[order[at]]
            at += 1
        ids += sentence
    return ids + tail, spans


def _needle(label: str | None, key: str) -> str:
    return NEEDLE.format(key=key) if label is None else LABELLED_NEEDLE.format(label=label, key=key)


def _distractor_keys(key: str, count: int) -> list[str]:
    """`count` keys unlike `key` and each other, the same for the same key in every run."""
    keys: list[str] = []
    attempt = 0
    while len(keys) < count:
        candidate = draw_key(0, "distractor", key, attempt)
        attempt += 1
        if candidate != key and candidate not in keys:
            keys.append(candidate)
    return keys


def passkey_found(answer: str, key: str) -> bool:
    """The paper's score: the key appears in the generated answer."""
    return key in answer


def _encoder(tokenizer):
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return encode
