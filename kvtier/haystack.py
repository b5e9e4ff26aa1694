"""Passkey retrieval prompts (a needle in a haystack of filler), built to a length in tokens, and their scorer."""
from __future__ import annotations

import random
from dataclasses import dataclass

# The classic passkey prompt (Landmark Attention, Mohtashami & Jaggi 2023). Plain text, no chat template:
# SmolLM2-135M-Instruct answers "a magical key that..." under its chat template even at 2K tokens, and reads the key
# back from the plain prompt (9/9 at 4K tokens, stock).
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    """One prompt: `ids` end with the question, the answer should contain `key`."""

    ids: list[int]
    key: str
    depth: float          # requested: the fraction of the filler that comes before the needle
    length: int           # len(ids), within a few tokens of the requested length
    needle_start: int     # index in ids of the needle's first token


def draw_key(seed: int, *labels: object) -> str:
    """A 5-digit key, the same for the same seed and labels (a sample's length, depth, index) in every run."""
    # A str seed is hashed with SHA-512, so it does not depend on PYTHONHASHSEED.
    return str(random.Random(f"{seed}:{':'.join(map(str, labels))}").randint(10000, 99999))


def build_sample(tokenizer, length: int, depth: float, key: str) -> PasskeySample:
    """INSTRUCTION, filler with the needle at `depth`, QUESTION: `length` tokens, give or take half a sentence.

    Pieces are tokenized separately, each after a space, which gives the same ids as tokenizing the whole text
    (the tokenizer splits before a space), so the token count is known without re-tokenizing 1M-token prompts."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction between 0 and 1, got {depth}")
    encode = _encoder(tokenizer)
    head, needle, tail = encode(INSTRUCTION), encode(" " + NEEDLE.format(key=key)), encode(" " + QUESTION)
    sentences = [encode(" " + sentence) for sentence in FILLER]
    budget = length - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise ValueError(f"a passkey prompt needs at least {length - budget} tokens, asked for {length}")
    filler = _fill(sentences, budget)
    boundaries = [0]
    for sentence in filler:
        boundaries.append(boundaries[-1] + len(sentence))
    cut = min(range(len(boundaries)), key=lambda i: abs(boundaries[i] - depth * boundaries[-1]))
    before = [token for sentence in filler[:cut] for token in sentence]
    after = [token for sentence in filler[cut:] for token in sentence]
    ids = head + before + needle + after + tail
    return PasskeySample(ids=ids, key=key, depth=depth, length=len(ids), needle_start=len(head) + len(before))


def passkey_found(answer: str, key: str) -> bool:
    """The paper's score: the key appears in the generated answer."""
    return key in answer


def _encoder(tokenizer):
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return encode


def _fill(sentences: list[list[int]], budget: int) -> list[list[int]]:
    """Filler sentences, cycled, whose total token count is the closest to `budget`."""
    filler, total = [], 0
    while True:
        sentence = sentences[len(filler) % len(sentences)]
        if abs(total + len(sentence) - budget) >= abs(total - budget):
            return filler
        filler.append(sentence)
        total += len(sentence)
