"""Build kvtier/tools/data/prose.txt.xz, the natural text `kvtier niah --haystack natural` hides its needles in.

Run once, then commit the result; the command reads the committed file, so the haystack is the same on every
machine whatever its Python and package versions (`kvtier.tools.corpus.CORPUS_SHA256` pins it):

    .venv/bin/python scripts/build_corpus.py    # writes prose.txt.xz, NOTICE.md, LICENSES.txt; prints the sha256

The prose is documentation of installed packages under permissive licenses, in this order: the Python language
reference topics of pydoc_data (PSF), docstrings of the Python standard library (PSF), numpy (BSD-3-Clause), torch
(BSD-3-Clause), transformers (Apache-2.0) and networkx (BSD-3-Clause, a dependency of torch). Docstrings are read
from the source files with `ast` (nothing is imported; torch's `add_docstr(...)` texts count as docstrings), file by
file in path order and, within a file, in the order they are written. Of each text only prose paragraphs are kept (no
indented block: code, doctests, parameter lists, literal blocks; no section underlines, lists or directives),
reStructuredText and Markdown markup is reduced to its words, paragraphs are cut into sentences, and a sentence is
kept only the first time it appears anywhere, if it reads as an English sentence (a capital letter first, a full stop,
question or exclamation mark last, ASCII words, no code characters, no URL), has no run of 7 or more digits (the
needles' numbers are 7 digits), does not say "magic number" (the needles' phrase) and names no city of the needles
(kvtier.tools.tasks.CITIES). Sentences are appended in document order until MAX_CHARS characters; the file holds one
sentence per line. The license texts go into LICENSES.txt and a summary of the sources into NOTICE.md beside it.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import inspect
import lzma
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "kvtier" / "tools" / "data"
MAX_CHARS = 4_000_000
# (package, license, copyright holder) of each source after the first two (the Python documentation and the standard
# library, both PSF); their folders are found through the installed package.
PACKAGES = (("numpy", "BSD-3-Clause", "NumPy Developers"),
            ("torch", "BSD-3-Clause", "Facebook, Inc. and its affiliates (PyTorch)"),
            ("transformers", "Apache-2.0", "The HuggingFace Team"),
            ("networkx", "BSD-3-Clause", "NetworkX Developers (Aric Hagberg, Dan Schult, Pieter Swart)"))
# Folders of tests, vendored third-party code and bundled applications, not the package's own documentation.
SKIPPED_FOLDERS = {"test", "tests", "testing", "idle_test", "site-packages", "dist-packages", "_vendor", "vendored",
                   "third_party", "__pycache__", "lib2to3", "ensurepip", "turtledemo", "idlelib"}

_UNDERLINE = re.compile(r"^([-=~^*#+`'\".:_])\1{2,}\s*$")
_FIELD = re.compile(r"^[\w*, .\[\]]+ : |^[\w*]+ \([^)]*\):|^:\w")  # numpydoc `x : int`, Google `x (int):`, `:param`
_NOT_PROSE_START = re.compile(r"^(>>>|\.\.\.|\.\. |[-*+|#@]|\d+[.)] |\w+:\s*$|Examples?\b|Example:)")
_ROLE = re.compile(r":[\w:+-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_MD_LINK = re.compile(r"\[`~?([^`\]]+)`\]|\[([^\]]+)\]\([^)]*\)")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_{1,2}")
_LITERAL = re.compile(r"``([^`]+)``|`([^`]+)`_{0,2}")
_EMPHASIS = re.compile(r"\*\*([^*]+)\*\*|(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])")
_FOOTNOTE = re.compile(r"\s*\[(?:\d+|#\w*|\*)\]_?")
# A sentence ends at . ! or ? (perhaps closed by a quote or bracket) before a space and a capital letter, unless the
# word before the full stop is an abbreviation or an initial.
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')]?\s+(?=[A-Z\"(])")
_ABBREVIATIONS = {"e.g", "i.e", "etc", "vs", "cf", "al", "Mr", "Mrs", "Ms", "Dr", "St", "No", "Fig", "Eq", "Ref",
                  "Sec", "approx", "resp", "ca", "Vol", "vol", "pp", "Ph.D", "U.S", "viz", "Jr", "Sr", "Inc", "Ltd"}
_CODE_CHARACTERS = set("`{}[]<>=|\\^$#@*~;")
# Typography the sentences are written without (the corpus is ASCII).
_TYPOGRAPHY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                             "\u2014": " - ", "\u2026": "...", "\u00a0": " "})
_SENTENCE_END = re.compile(r"[a-z0-9)\"'][.!?][\"')]?$")
_LONG_NUMBER = re.compile(r"\d{7}")


def _python_docs() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _docstrings(folder: Path) -> Iterator[str]:
    """Every docstring (module, class, function) of the .py files below `folder`, file by file in path order, each
    file's in source order; files that do not parse are passed over."""
    for path in sorted(folder.rglob("*.py")):
        if SKIPPED_FOLDERS & set(path.relative_to(folder).parts[:-1]) or path.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        yield from _in_source_order(tree)


def _in_source_order(node: ast.AST) -> Iterator[str]:
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        docstring = ast.get_docstring(node, clean=False)
        if docstring:
            yield docstring
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.If, ast.Try)):
            yield from _in_source_order(child)
        elif isinstance(child, ast.Expr) and isinstance(child.value, ast.Call):
            yield from _attached_docstrings(child.value)


def _attached_docstrings(call: ast.Call) -> Iterator[str]:
    """The text of `add_docstr(obj, "...")`-style calls (torch documents its C functions so), also when the text is
    `"...".format(...)`."""
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    if not name.endswith("add_docstr"):
        return
    for argument in call.args:
        if isinstance(argument, ast.Call) and isinstance(argument.func, ast.Attribute) \
                and argument.func.attr == "format":
            argument = argument.func.value
        if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
            yield inspect.cleandoc(argument.value)


def prose_paragraphs(text: str) -> Iterator[str]:
    """The paragraphs of a docstring or help text that are prose, each as one line."""
    for block in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        lines = block.splitlines()
        if not lines or any(line[:1].isspace() or _UNDERLINE.match(line) or _FIELD.match(line) for line in lines):
            continue
        if _NOT_PROSE_START.match(lines[0]) or block.rstrip().endswith("::"):
            continue
        yield " ".join(line.strip() for line in lines)


def plain(paragraph: str) -> str:
    """reStructuredText and Markdown markup reduced to its words; whitespace collapsed."""
    def last_name(match: re.Match) -> str:
        name = next(group for group in match.groups() if group is not None).strip()
        return name.rsplit(".", 1)[-1] if match.group(0).startswith((":", "[`~")) and "~" in match.group(0) else name

    text = _FOOTNOTE.sub("", paragraph.translate(_TYPOGRAPHY))
    text = _ROLE.sub(last_name, text)
    text = _MD_LINK.sub(last_name, text)
    text = _RST_LINK.sub(r"\1", text)
    text = _LITERAL.sub(lambda match: match.group(1) or match.group(2), text)
    text = _EMPHASIS.sub(lambda match: match.group(1) or match.group(2), text)
    return re.sub(r"\s+", " ", text).strip()


def sentences(paragraph: str) -> list[str]:
    pieces, start = [], 0
    for match in _BOUNDARY.finditer(paragraph):
        before = paragraph[start:match.start()].rstrip(".!?\"')")
        word = before.rsplit(" ", 1)[-1]
        if word in _ABBREVIATIONS or re.fullmatch(r"[A-Za-z]|[A-Z][a-z]?\.[A-Za-z]", word):
            continue
        end = match.start() + len(match.group(0).rstrip())
        pieces.append(paragraph[start:end].strip())
        start = match.end()
    pieces.append(paragraph[start:].strip())
    return [piece for piece in pieces if piece]


def reads_as_prose(sentence: str, banned_words: re.Pattern) -> bool:
    words = sentence.split(" ")
    letters = sum(character.isalpha() or character == " " for character in sentence)
    return (20 <= len(sentence) <= 400 and len(words) >= 4 and sentence[0].isupper() and sentence.isascii()
            and sentence.isprintable() and _SENTENCE_END.search(sentence) is not None
            and not _CODE_CHARACTERS & set(sentence) and letters >= 0.8 * len(sentence)
            and "http" not in sentence and "www." not in sentence and "..." not in sentence
            and not _LONG_NUMBER.search(sentence) and banned_words.search(sentence) is None)


def sources() -> list[dict]:
    """Each source, in corpus order: its name, SPDX license, copyright holder, license text and texts."""
    version = ".".join(map(str, sys.version_info[:3]))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    psf = {"license": "PSF-2.0", "copyright": "Python Software Foundation", "license_text": _psf_license(stdlib)}
    found = [{"name": f"Python {version} documentation topics (pydoc_data.topics)", **psf, "texts": _python_docs()},
             {"name": f"Python {version} standard library docstrings", **psf, "texts": _docstrings(stdlib)}]
    for package, license_name, holder in PACKAGES:
        folder = Path(importlib.util.find_spec(package).submodule_search_locations[0])  # found, not imported
        found.append({"name": f"{package} {importlib.metadata.version(package)} docstrings", "license": license_name,
                      "copyright": holder, "license_text": _package_license(package), "texts": _docstrings(folder)})
    return found


def _psf_license(stdlib: Path) -> str:
    """The PSF License Agreement, as the Python installation's LICENSE.txt words it."""
    text = (stdlib / "LICENSE.txt").read_text()
    start = text.index("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
    return text[start:text.index("BEOPEN.COM LICENSE AGREEMENT", start)].strip()


def _package_license(package: str) -> str:
    """The package's own license file (numpy's without the list of software its binaries bundle)."""
    path = next(file for file in importlib.metadata.files(package) if re.search(r"licenses/LICENSE[^/]*$", str(file)))
    return path.read_text().split("\n----")[0].strip()


def build(max_chars: int) -> tuple[list[str], list[dict]]:
    """(sentences, sources with their counts): every source's new prose sentences, in order, up to max_chars."""
    from kvtier.tools.tasks import CITIES

    banned = re.compile(r"magic number|\b(" + "|".join(map(re.escape, CITIES)) + r")\b", re.IGNORECASE)
    kept: list[str] = []
    seen: set[str] = set()
    total, found = 0, sources()
    for source in found:
        source.update(sentences=0, chars=0)
        for text in source.pop("texts"):
            for paragraph in prose_paragraphs(text):
                for sentence in sentences(plain(paragraph)):
                    if total >= max_chars or sentence in seen or not reads_as_prose(sentence, banned):
                        continue
                    seen.add(sentence)
                    kept.append(sentence)
                    total += len(sentence) + 1
                    source["sentences"] += 1
                    source["chars"] += len(sentence) + 1
    return kept, found


def notice(found: list[dict], text: bytes, compressed: bytes) -> str:
    """NOTICE.md: what the corpus is, where each part comes from and under which license."""
    rows = "\n".join(f"| {s['name']} | {s['license']} | {s['copyright']} | {s['sentences']:,} | {s['chars']:,} |"
                     for s in found)
    lines = text.count(b"\n")
    return f"""# prose.txt.xz: the natural-text haystack of `kvtier niah`

One English sentence per line: {lines:,} sentences, {len(text):,} bytes of ASCII ({len(compressed):,} compressed
with xz); the sha256 of the decompressed text is `{hashlib.sha256(text).hexdigest()}`.

Built by `scripts/build_corpus.py` from the documentation of installed packages: prose paragraphs of their
docstrings (and the Python documentation topics that pydoc shows), without code, doctests, parameter lists or markup,
cut into sentences, each sentence kept once, in document order.

Changes made to the sources (PSF License Agreement, clause 3): only sentences of prose were taken; reStructuredText
and Markdown markup was reduced to its words; typographic quotes and dashes were written in ASCII.

| source | license | copyright | sentences | characters |
|---|---|---|---|---|
{rows}

The license texts are in LICENSES.txt beside this file. Each source's text remains under its own license.
"""


def licenses(found: list[dict]) -> str:
    texts = {}
    for source in found:  # one text per license file (the two Python sources share one)
        texts.setdefault(source["license_text"], []).append(source["name"])
    return "\n\n".join(f"{'=' * 79}\n{', '.join(names)}\n{'=' * 79}\n\n{text}" for text, names in texts.items()) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder to write into (default {OUT})")
    parser.add_argument("--max-chars", type=int, default=MAX_CHARS,
                        help=f"stop adding sentences at this many characters (default {MAX_CHARS:,})")
    args = parser.parse_args()
    kept, found = build(args.max_chars)
    text = "".join(sentence + "\n" for sentence in kept).encode("ascii")
    compressed = lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prose.txt.xz").write_bytes(compressed)
    (args.out / "NOTICE.md").write_text(notice(found, text, compressed))
    (args.out / "LICENSES.txt").write_text(licenses(found))
    print(f"{len(kept):,} sentences, {len(text):,} bytes, {len(compressed):,} compressed, sha256 "
          f"{hashlib.sha256(text).hexdigest()} (put it in kvtier/tools/corpus.py's CORPUS_SHA256)")
    for source in found:
        print(f"  {source['name']}: {source['sentences']:,} sentences, {source['chars']:,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
