"""The natural text of `kvtier niah --haystack natural`: the packaged prose (data/prose.txt.xz, built once by
scripts/build_corpus.py from permissively licensed documentation; data/NOTICE.md names the sources) and its sentences
as token ids, read as a ring."""
from __future__ import annotations

import functools
import hashlib
import itertools
import lzma
from importlib import resources
from typing import Any, Iterator, Sequence

CORPUS_NAME = "prose.txt.xz"
# sha256 of the decompressed text: every machine reads the same haystack (46,183 sentences, 3,946,033 characters;
# 842,902 tokens of SmolLM2's tokenizer, each sentence tokenized after a space).
CORPUS_SHA256 = "1d9f75f0ebee0c793d074c5eaa31e64e6ceb8e708900710eeb0a9e00ca19323d"
FILL = ("whole sentences of the corpus in order, read as a ring from a sentence the sample's seed picks (or the "
        "nearest after it from which whole sentences fill the prompt to exactly its length): no sentence repeats "
        "within a prompt shorter than the corpus; a longer prompt goes round it again")


class CorpusError(RuntimeError):
    """The packaged corpus is missing or damaged; the message says how to restore it."""


@functools.cache
def corpus_sentences() -> tuple[str, ...]:
    """The corpus, one sentence per entry, in document order; no sentence appears twice."""
    where = f"kvtier/tools/data/{CORPUS_NAME}"
    try:
        text = lzma.decompress(resources.files("kvtier.tools").joinpath("data", CORPUS_NAME).read_bytes())
    except (OSError, lzma.LZMAError) as err:
        raise CorpusError(f"cannot read the natural-text corpus {where} ({err}): reinstall kvtier (the file is "
                          f"package data), or run with --haystack filler") from None
    digest = hashlib.sha256(text).hexdigest()
    if digest != CORPUS_SHA256:
        raise CorpusError(f"the natural-text corpus {where} has sha256 {digest}, not {CORPUS_SHA256}: restore the "
                          f"committed file (git restore, or reinstall kvtier); after rebuilding it with "
                          f"scripts/build_corpus.py, set kvtier.tools.corpus.CORPUS_SHA256")
    return tuple(text.decode("ascii").splitlines())


def corpus_info(sentences: Sequence[str] | None = None) -> dict[str, Any]:
    """What a results.json records of the corpus (default: the packaged one): name, sha256 of its text (a sentence
    per line), size, and how prompts are filled."""
    packaged = sentences is None
    sentences = corpus_sentences() if packaged else sentences
    text = "".join(sentence + "\n" for sentence in sentences).encode()
    return {"name": CORPUS_NAME if packaged else "given sentences", "sha256": hashlib.sha256(text).hexdigest(),
            "sentences": len(sentences), "chars": len(text), "fill": FILL}


class TokenizedCorpus:
    """The corpus' sentences (default: the packaged ones) as token ids of one tokenizer, each tokenized after a space
    (as it stands after the text before it; the tokenizer must split before a space, as byte-level BPEs like
    SmolLM2's do), read as a ring."""

    def __init__(self, tokenizer, sentences: Sequence[str] | None = None):
        self.tokenizer = tokenizer
        self.texts = sentences
        spaced = [" " + sentence for sentence in (corpus_sentences() if sentences is None else sentences)]
        if getattr(tokenizer, "is_fast", False):  # a Rust tokenizer takes the whole list at once (~3 s for SmolLM2's)
            self.sentences = tokenizer(spaced, add_special_tokens=False)["input_ids"]
        else:
            self.sentences = [self.encode(text) for text in spaced]
        self.cumulative = [0, *itertools.accumulate(map(len, self.sentences))]  # tokens before each sentence
        self.tokens = self.cumulative[-1]

    def __len__(self) -> int:
        return len(self.sentences)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def ring(self, start: int) -> Iterator[list[int]]:
        """The sentences from `start` on, going round the corpus for ever."""
        index = start % len(self.sentences)
        while True:
            yield self.sentences[index]
            index = (index + 1) % len(self.sentences)

    def info(self) -> dict[str, Any]:
        """corpus_info() and the corpus' length in this tokenizer's tokens: the longest prompt whose haystack holds
        no sentence twice."""
        return {**corpus_info(self.texts), "tokens": self.tokens}


_last: list[TokenizedCorpus] = []


def tokenized_corpus(tokenizer) -> TokenizedCorpus:
    """The TokenizedCorpus of `tokenizer`, kept for the last tokenizer asked (a sweep's methods share it)."""
    if not _last or _last[0].tokenizer is not tokenizer:
        _last[:] = [TokenizedCorpus(tokenizer)]
    return _last[0]
