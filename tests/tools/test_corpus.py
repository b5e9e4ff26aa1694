"""The natural text of `kvtier niah --haystack natural`: the packaged corpus, what its build script promises, and its
sentences as token ids read as a ring."""
from __future__ import annotations

import hashlib
import lzma
import re
import tomllib
from pathlib import Path

import pytest

from kvtier.tools import corpus
from kvtier.tools.cli import main
from kvtier.tools.corpus import (
    CORPUS_NAME, CORPUS_SHA256, CorpusError, TokenizedCorpus, corpus_info, corpus_sentences, tokenized_corpus,
)
from kvtier.tools.model import ByteTokenizer
from kvtier.tools.tasks import CITIES, build_task_sample
from tests.tools.test_cli import real_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "kvtier" / "tools" / "data"
# More characters per SmolLM2 token than the corpus has (4.68): a prefix this long holds more than 256K tokens.
CHARS_PER_TOKEN_BOUND = 6


def test_the_corpus_is_the_committed_file():
    text = lzma.decompress((DATA / CORPUS_NAME).read_bytes())
    assert hashlib.sha256(text).hexdigest() == CORPUS_SHA256
    assert corpus_sentences() == tuple(text.decode("ascii").splitlines())
    assert corpus_info()["sha256"] == CORPUS_SHA256 and corpus_info()["chars"] == len(text)


def test_no_sentence_repeats_within_the_first_256k_tokens_or_anywhere():
    sentences, chars, first = corpus_sentences(), 0, 0
    while chars < 256 * 1024 * CHARS_PER_TOKEN_BOUND:
        chars += len(sentences[first]) + 1
        first += 1
    assert len(set(sentences[:first])) == first
    assert len(set(sentences)) == len(sentences)  # so a prompt starting anywhere repeats none before going round


def test_every_sentence_reads_as_prose_and_hides_nothing_a_needle_says():
    cities = re.compile(r"\b(" + "|".join(CITIES) + r")\b", re.IGNORECASE)
    for sentence in corpus_sentences():
        assert sentence == sentence.strip() and "  " not in sentence and sentence.isascii(), sentence
        assert sentence[0].isupper() and sentence[-1] in ".!?\"')", sentence
        assert not re.search(r"\d{7}", sentence) and "magic number" not in sentence.lower(), sentence
        assert not cities.search(sentence), sentence


def test_the_corpus_ships_as_package_data_with_its_notice():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "kvtier.tools.data" in setuptools["packages"]
    assert CORPUS_NAME in setuptools["package-data"]["kvtier.tools.data"]
    assert (DATA / CORPUS_NAME).stat().st_size < 2 << 20
    notice = (DATA / "NOTICE.md").read_text()
    assert CORPUS_SHA256 in notice and all(name in notice for name in ("PSF-2.0", "BSD-3-Clause", "Apache-2.0"))
    licenses = (DATA / "LICENSES.txt").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in licenses and "Apache License" in licenses
    assert licenses.count("Redistribution and use in source and binary forms") == 3  # numpy, torch, networkx


@pytest.fixture
def damaged_corpus(monkeypatch):
    corpus_sentences.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    corpus_sentences.cache_clear()


def test_a_damaged_corpus_is_refused_naming_the_fix(damaged_corpus, capsys):
    damaged_corpus.setattr(corpus, "CORPUS_SHA256", "0" * 64)
    with pytest.raises(CorpusError, match=f"has sha256 {CORPUS_SHA256}, not 0+: restore the committed file"):
        corpus_sentences()
    damaged_corpus.setattr("kvtier.tools.model.random_llama", lambda *_: pytest.fail("the model must not load"))
    assert main(["niah", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "restore the committed file" in err and "Traceback" not in err


def test_a_missing_corpus_says_to_reinstall_or_use_the_filler(damaged_corpus):
    damaged_corpus.setattr(corpus, "CORPUS_NAME", "absent.txt.xz")
    with pytest.raises(CorpusError, match="reinstall kvtier .* or run with --haystack filler"):
        corpus_sentences()


def test_tokenized_corpus_is_a_ring_of_sentences_each_after_a_space():
    ring = TokenizedCorpus(ByteTokenizer(), ["First one.", "Second one.", "Third one."])
    assert ring.sentences[0] == list(b" First one.") and ring.tokens == sum(len(s) + 1 for s in ring.texts)
    reading = ring.ring(2)
    assert [bytes(next(reading)) for _ in range(4)] == [b" Third one.", b" First one.", b" Second one.",
                                                         b" Third one."]
    info = ring.info()
    assert (info["name"], info["sentences"], info["tokens"]) == ("given sentences", 3, ring.tokens)


def test_a_sweep_tokenizes_the_corpus_once_per_tokenizer():
    tokenizer = ByteTokenizer()
    first = tokenized_corpus(tokenizer)
    assert tokenized_corpus(tokenizer) is first and first.tokens == corpus_info()["chars"]  # one token per byte
    assert tokenized_corpus(ByteTokenizer()) is not first


def test_a_prompt_longer_than_the_corpus_goes_round_it_again():
    ring = TokenizedCorpus(ByteTokenizer(), [f"Sentence number {word} of a tiny corpus." for word in
                                             ("one", "two", "three", "four", "five", "six")])
    short = build_task_sample(ring, 400, 0.5, draw="a")
    long = build_task_sample(ring, 1200, 0.5, draw="a")
    assert short.corpus_sentences <= len(ring) < long.corpus_sentences
    text = ByteTokenizer().decode(long.ids)
    assert all(text.count(sentence) >= 2 for sentence in ring.texts)


@pytest.mark.real_model
def test_smollm2_reads_the_corpus_as_842902_tokens_and_pieces_join_as_the_whole():
    tokenizer = real_tokenizer()
    ring = TokenizedCorpus(tokenizer)
    assert ring.tokens == 842_902 > 256 * 1024
    whole = tokenizer(" " + " ".join(corpus_sentences()), add_special_tokens=False)["input_ids"]
    assert whole == [token for sentence in ring.sentences for token in sentence]
    for task in ("niah_single", "multiquery"):
        sample = build_task_sample(ring, 3000, 0.5, task, 3, draw="real")
        assert tokenizer(tokenizer.decode(sample.ids), add_special_tokens=False)["input_ids"] == sample.ids
        assert sample.length == 3000
