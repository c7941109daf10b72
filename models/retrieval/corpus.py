"""Corpus ingestion, streaming (docs/retrieval.md, "Quick start"): a text file, a folder of them, JSONL, or
Python's own documentation. A corpus is an iterator of :class:`Document` pieces: a big text file comes as
several (``continued=True`` after the first), so corpora larger than memory stream through. Problem files
(empty, binary, bad JSONL lines, non-UTF-8) never crash ingestion: each is reported by ``warn`` and counted
in ``CorpusStats``.
"""
from __future__ import annotations

import ast
import re
import dataclasses
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .manifest import sha256_file

PIECE_BYTES = 1 << 20       # a large text file is yielded in pieces of about this many bytes
BINARY_SNIFF_BYTES = 8192   # a NUL byte in the first bytes marks a file as binary
JSONL_SUFFIXES = (".jsonl", ".ndjson")

DEFAULT_CORPUS = "python-docs"


@dataclasses.dataclass(frozen=True)
class Document:
    """A document, or one piece of it: ``continued`` pieces extend the previous document."""

    doc_id: str
    text: str
    continued: bool = False


@dataclasses.dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    skipped_empty: int = 0
    skipped_binary: int = 0
    skipped_bad_lines: int = 0
    decoded_with_replacement: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _stderr_warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def corpus_files(path: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[tuple[Path, str]]:
    """The files of corpus ``path`` as (path, document name), in reading order.

    A folder's hidden files and folders are skipped, and so is every folder in
    ``exclude`` (a database built into a folder inside its own corpus never reads itself).
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"corpus: {str(path)!r} does not exist (expected a text file, a folder, or a .jsonl file)")
    if root.is_file():
        return [(root, root.name)]
    skip = [Path(e).resolve() for e in exclude]

    def wanted(p: Path) -> bool:
        if any(part.startswith(".") for part in p.relative_to(root).parts) or not p.is_file():
            return False
        resolved = p.resolve()
        return not any(resolved == s or s in resolved.parents for s in skip)

    files = sorted(p for p in root.rglob("*") if wanted(p))
    if not files:
        raise ValueError(f"corpus: folder {str(path)!r} contains no files")
    return [(f, f.relative_to(root).as_posix()) for f in files]


def iter_corpus(
    path: str | os.PathLike | None,
    stats: CorpusStats | None = None,
    warn: Callable[[str], None] = _stderr_warn,
    exclude: Iterable[str | os.PathLike] = (),
) -> Iterator[Document]:
    """Stream the documents of ``path`` (file or folder), or the default corpus for None."""
    stats = stats if stats is not None else CorpusStats()
    if path is None or str(path) == DEFAULT_CORPUS:
        for doc in python_docs_corpus():  # (whole documents)
            stats.documents += 1
            yield doc
        return
    for file, name in corpus_files(path, exclude):
        yield from _iter_file(file, name, stats, warn)


HASH_LIMIT_BYTES = 256 << 20  # corpora up to this size are fingerprinted by content, larger ones by size + mtime


def fingerprint(path: str | os.PathLike | None, exclude: Iterable[str | os.PathLike] = ()) -> dict:
    """What the corpus is now: per file its size and sha256 (or, for a large corpus, size and mtime).

    A database records it when its build starts; a later run compares (``fingerprint_changes``).
    The default corpus is Python's own documentation: it changes with the Python version.
    """
    if path is None or str(path) == DEFAULT_CORPUS:
        return {"kind": DEFAULT_CORPUS, "python": platform.python_version()}
    files = corpus_files(path, exclude)
    by_content = sum(f.stat().st_size for f, _ in files) <= HASH_LIMIT_BYTES
    out = {name: {"size": file.stat().st_size, **({"sha256": sha256_file(file)} if by_content else
                                                  {"mtime_ns": file.stat().st_mtime_ns})} for file, name in files}
    return {"kind": "files", "by": "content" if by_content else "size and mtime", "files": out}


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, in words (empty: the same corpus)."""
    if old == new:
        return []
    if old.get("kind") != "files" or new.get("kind") != "files" or old.get("by") != new.get("by"):
        return [f"it was {old}, it is {new}"]
    a, b = old["files"], new["files"]

    def names(xs: list) -> str:
        return ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")

    found = {"added": sorted(set(b) - set(a)), "removed": sorted(set(a) - set(b)),
             "changed": sorted(n for n in set(a) & set(b) if a[n] != b[n])}
    return [f"{label}: {names(xs)}" for label, xs in found.items() if xs]


def _iter_file(path: Path, name: str, stats: CorpusStats, warn: Callable[[str], None]) -> Iterator[Document]:
    stats.files += 1
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(BINARY_SNIFF_BYTES)
    except OSError as e:
        warn(f"{path}: cannot be read ({e.strerror}); skipped")
        stats.skipped_binary += 1
        return
    if size == 0 or not head.strip():
        warn(f"{path}: empty file; skipped")
        stats.skipped_empty += 1
        return
    if b"\x00" in head:
        warn(f"{path}: looks binary (contains NUL bytes); skipped")
        stats.skipped_binary += 1
        return
    if path.suffix.lower() in JSONL_SUFFIXES:
        yield from _iter_jsonl(path, name, stats, warn)
    else:
        yield from _iter_text(path, name, stats, warn)


def _decode(data: bytes, path: Path, stats: CorpusStats, warn: Callable[[str], None], warned: list[bool]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if not warned[0]:
            warn(f"{path}: not valid UTF-8 (first bad byte at offset {e.start} of a block); "
                 "decoded with U+FFFD replacement characters")
            stats.decoded_with_replacement += 1
            warned[0] = True
        return data.decode("utf-8", errors="replace")


def _iter_text(path: Path, name: str, stats: CorpusStats, warn: Callable[[str], None]) -> Iterator[Document]:
    """One document per file, read in pieces of about PIECE_BYTES, split at line ends."""
    warned = [False]
    yielded = False
    with open(path, "rb") as f:
        block: list[bytes] = []
        block_bytes = 0
        for line in f:  # binary line iteration keeps a multi-byte character whole
            block.append(line)
            block_bytes += len(line)
            if block_bytes >= PIECE_BYTES:
                yield Document(name, _decode(b"".join(block), path, stats, warn, warned), continued=yielded)
                yielded = True
                block, block_bytes = [], 0
        if block:
            text = _decode(b"".join(block), path, stats, warn, warned)
            if text.strip() or yielded:
                yield Document(name, text, continued=yielded)
                yielded = True
    if yielded:
        stats.documents += 1
    else:
        warn(f"{path}: contains only whitespace; skipped")
        stats.skipped_empty += 1


def _iter_jsonl(path: Path, name: str, stats: CorpusStats, warn: Callable[[str], None]) -> Iterator[Document]:
    warned = [False]
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = _decode(raw, path, stats, warn, warned)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                warn(f"{path}:{lineno}: not valid JSON ({e.msg}); line skipped")
                stats.skipped_bad_lines += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                warn(f"{path}:{lineno}: expected an object with a string field 'text'; line skipped")
                stats.skipped_bad_lines += 1
                continue
            if not record["text"].strip():
                stats.skipped_empty += 1
                continue
            doc_id = record.get("id")
            doc_id = f"{name}:{lineno}" if doc_id is None else str(doc_id)
            stats.documents += 1
            yield Document(doc_id, record["text"])


# --------------------------------------------------------------------------------------
# Sections

_UNDERLINE = re.compile(r"([*=\-~^#+])\1{2,}")


def split_sections(text: str) -> list[str]:
    """``text`` cut before every section heading and after its heading lines, losslessly.

    A heading is a line followed by an underline of one repeated punctuation
    character (reStructuredText, and the plain-text renderings of Python's docs),
    or a Markdown ``#`` line. The pieces join back to ``text``. A database built
    with ``align_sections`` starts each piece on a chunk boundary, so a section
    that two documents share (one topic quoted whole inside another) is cut into
    the same chunks in both, wherever it sits in each.
    """
    lines = text.splitlines(keepends=True)
    cuts = {0}
    for i, line in enumerate(lines):
        markdown = line.startswith("#") and line[:7].lstrip("#").startswith(" ")
        underlined = (i + 1 < len(lines) and line.strip() and _UNDERLINE.fullmatch(lines[i + 1].strip())
                      and not _UNDERLINE.fullmatch(line.strip()))
        if markdown or underlined:
            end = i + (1 if markdown else 2)
            while end < len(lines) and not lines[end].strip():  # blank lines stay with the heading
                end += 1
            cuts.update((i, end))
    bounds = sorted(c for c in cuts if c <= len(lines)) + [len(lines)]
    pieces = ["".join(lines[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    return pieces or [text]


# --------------------------------------------------------------------------------------
# The default corpus: Python's own documentation.

# Folders of the standard library that are tests, tools or vendored code, not documentation.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "ensurepip",
              "lib2to3", "pydoc_data", "__pycache__", "venv", "config-3"}
MIN_DOC_CHARS = 200  # modules with less documentation than this are left out


def _module_document(source: bytes, module: str) -> str | None:
    """The module docstring and the docstrings of its public classes and functions."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                parts.append(f"{kind} {node.name}\n\n{doc}")
    text = "\n\n".join(parts)
    return text if len(text) >= MIN_DOC_CHARS else None


def python_docs_corpus() -> Iterator[Document]:
    """Python's documentation: each ``pydoc_data.topics`` topic, then each stdlib module (sorted)."""
    import pydoc_data.topics

    for topic in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[topic]
        if text.strip():
            yield Document(f"topic:{topic}", text)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = Path(dirpath) / filename
            rel = path.relative_to(stdlib).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            module = ".".join(parts)
            try:
                text = _module_document(path.read_bytes(), module)
            except OSError:
                continue
            if text:
                yield Document(f"module:{module}", text)
