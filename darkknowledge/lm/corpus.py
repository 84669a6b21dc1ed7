"""Text corpora for language-model distillation: documents as plain strings.

Sources:

* :func:`builtin_corpus`: an offline corpus that needs nothing but the Python install: the
  docstrings of the standard library's modules, classes and functions, read from the source
  files under ``sysconfig.get_paths()["stdlib"]`` with :mod:`ast` (nothing is imported, so no
  module runs), cleaned with ``inspect.cleandoc``, cut into paragraphs, filtered to prose and
  de-duplicated. On CPython 3.11.7 that is 4,269 paragraphs from 565 files (0.84 MB of text,
  about 194k SmolLM2 tokens), gathered in about 2.5 s on one CPU core; it is computed once per
  process and not cached on disk (the token cache keeps its ids). The text (and so the corpus)
  depends on the Python version, and is identical across runs of one install.
* :func:`read_text`: a local ``.txt`` file (documents separated by blank lines), a ``.jsonl``
  file (one document per line, in field ``text``) or a folder of ``.txt`` files.
* :func:`read_instructions`: prompt/response pairs from JSONL, either as two fields or as a
  chat ``messages`` list.
* :func:`from_datasets` / :func:`instructions_from_datasets`: a Hugging Face ``datasets``
  dataset (optional package, imported only here).

:func:`split_documents` holds out whole documents, so no document is on both sides.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from darkknowledge.data.seeds import make_generator
from darkknowledge.data.sources.common import DataFormatError
from darkknowledge.data.splits import check_fraction
from darkknowledge.errors import ConfigError

logger = logging.getLogger(__name__)

Message = dict[str, str]
"""One chat message: ``{"role": "user" | "assistant" | "system", "content": str}``."""

Prompt = str | list[Message]
"""A prompt: a user message's text, or the chat messages before the response."""

MIN_PARAGRAPH_CHARS = 80
"""Shortest paragraph (after whitespace is collapsed) the built-in corpus keeps."""

MIN_PROSE_SHARE = 0.85
"""Least share of letters and spaces in a kept paragraph (prose, not code or tables)."""

SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "__pycache__",
        "ensurepip",
        "venv",
    }
)
"""Folders of the standard library the built-in corpus leaves out (tests, GUIs, installed packages)."""

SKIP_MODULES = frozenset({"antigravity", "this", "turtle", "__hello__", "__phello__"})
"""Top-level modules it leaves out (jokes and demos)."""

_HELDOUT_STREAM = 3
"""Stream tag of the held-out document draw (the tag :mod:`darkknowledge.data.splits` uses for splits)."""

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def _module_name(rel: Path) -> str:
    """``email/mime/text.py`` -> ``email.mime.text``; ``json/__init__.py`` -> ``json``."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _stdlib_files() -> list[tuple[str, Path]]:
    """``(module name, file)`` of the standard library's Python sources, sorted by module name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(("config-", "."))]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = Path(folder) / name
            module = _module_name(path.relative_to(root))
            if module and module.split(".")[0] not in SKIP_MODULES:
                out.append((module, path))
    return sorted(out)


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """The docstrings of a module and of its classes and functions, nested ones too, in source order."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            yield doc
        for node in tree.body:
            yield from _docstrings(node)
    elif isinstance(tree, (ast.If, ast.Try)):  # definitions under `if sys.platform ...:` or `try:`
        for node in [*tree.body, *tree.orelse]:
            yield from _docstrings(node)


def is_prose(paragraph: str) -> bool:
    """Whether a whitespace-collapsed paragraph reads as prose: at least ``MIN_PARAGRAPH_CHARS``
    characters, at least ``MIN_PROSE_SHARE`` of them letters or spaces, and no doctest or markup."""
    if len(paragraph) < MIN_PARAGRAPH_CHARS or paragraph.startswith((">>>", "...", "..", ":", "-", "*", "|", "+")):
        return False
    if ">>>" in paragraph or "::" in paragraph or "==" in paragraph:
        return False
    prose = sum(1 for c in paragraph if c.isalpha() or c == " ")
    return prose >= MIN_PROSE_SHARE * len(paragraph)


def paragraphs(text: str) -> list[str]:
    """The paragraphs of ``text`` (blank-line separated), each stripped; empty ones dropped."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def docstring_paragraphs(files: Iterable[Path]) -> list[str]:
    """The distinct prose paragraphs of the docstrings of ``files`` (Python sources, read with
    :mod:`ast`), in file and source order; a file that does not parse is skipped."""
    seen: dict[str, None] = {}
    skipped = 0
    for path in files:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            skipped += 1
            continue
        for doc in _docstrings(tree):
            for block in paragraphs(inspect.cleandoc(doc)):
                if block.split("\n", 1)[0].startswith((" ", "\t")):
                    continue  # an indented block: code or a table
                text = " ".join(block.split())
                if is_prose(text):
                    seen.setdefault(text, None)
    if skipped:
        logger.info("builtin corpus: %d standard-library files could not be parsed and were skipped", skipped)
    return list(seen)


@functools.lru_cache(maxsize=1)
def _builtin_paragraphs() -> tuple[str, ...]:
    return tuple(docstring_paragraphs(path for _, path in _stdlib_files()))


def builtin_corpus(max_docs: int | None = None) -> list[str]:
    """Prose paragraphs of the Python standard library's docstrings (one document each).

    Files are visited in sorted module order; within a file, docstrings in source order;
    repeated paragraphs are kept once (first occurrence). See the module docstring for size.

    Args:
        max_docs: Keep only the first ``max_docs`` paragraphs (None: all).

    Raises:
        ConfigError: ``max_docs`` is below 1, or the install has no standard-library sources.
    """
    if max_docs is not None and max_docs < 1:
        raise ConfigError(f"max_docs must be >= 1 or None (got {max_docs})")
    docs = _builtin_paragraphs()
    if not docs:
        raise ConfigError(
            f"no docstrings found under {sysconfig.get_paths()['stdlib']!r}: this Python install "
            "ships no standard-library sources; use source 'text' with your own files"
        )
    return list(docs[:max_docs])


def _check_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"text file or folder {str(path)!r} does not exist")
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{str(path)!r} is not UTF-8 text ({exc})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank line of a JSONL file."""
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(
                f"{str(path)!r} line {number}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(row, dict):
            raise DataFormatError(f"{str(path)!r} line {number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _field(row: Mapping[str, Any], field: str, where: str) -> str:
    if field not in row:
        raise DataFormatError(
            f"{where}: no field {field!r} (fields present: {sorted(row)}); name the text field "
            "with text_field / prompt_field / response_field"
        )
    value = row[field]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {field!r} must be a string (got {type(value).__name__})")
    return value


def read_text(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents from a local file or folder.

    Args:
        path: A ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file (one JSON
            object per line, the document in ``text_field``) or a folder whose ``.txt`` files
            (searched recursively, in sorted path order) are read as ``.txt`` files.
        text_field: The JSONL field holding the text.

    Returns:
        The non-empty documents, in file order.

    Raises:
        ConfigError: ``path`` does not exist, has another suffix, or holds no text.
        DataFormatError: A JSONL line is not a JSON object or lacks ``text_field`` (the error
            names the line and the fields it has), or a file is not UTF-8.
    """
    path = _check_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ConfigError(f"folder {str(path)!r} holds no .txt files")
        docs = [doc for f in files for doc in paragraphs(_read(f))]
    elif path.suffix == ".txt":
        docs = paragraphs(_read(path))
    elif path.suffix == ".jsonl":
        docs = [
            text.strip()
            for number, row in _jsonl_rows(path)
            if (text := _field(row, text_field, f"{str(path)!r} line {number}")).strip()
        ]
    else:
        raise ConfigError(f"cannot read {str(path)!r}: expected a .txt or .jsonl file or a folder of .txt files")
    if not docs:
        raise ConfigError(f"{str(path)!r} holds no text")
    return docs


def instruction_pair(row: Mapping[str, Any], prompt_field: str, response_field: str, where: str) -> tuple[Prompt, str]:
    """One ``(prompt, response)`` from a record: a chat ``messages`` list, else two text fields.

    A ``messages`` list must end with an assistant message: that is the response and the
    messages before it are the prompt.

    Raises:
        DataFormatError: The record has neither form, or its messages are malformed.
    """
    if prompt_field not in row and "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DataFormatError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}} objects")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            roles = [m["role"] for m in messages]
            raise DataFormatError(
                f"{where}: 'messages' must hold a prompt and end with an 'assistant' message "
                f"(the response); roles here: {roles}"
            )
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        return prompt, messages[-1]["content"]
    return _field(row, prompt_field, where), _field(row, response_field, where)


def read_instructions(
    path: str | Path,
    prompt_field: str = "prompt",
    response_field: str = "response",
) -> list[tuple[Prompt, str]]:
    """Prompt/response pairs from a JSONL file.

    Each line is either ``{prompt_field: str, response_field: str}`` or a chat record
    ``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the
    assistant's response (the prompt is then the list of the messages before it).

    Raises:
        ConfigError: ``path`` does not exist, is not ``.jsonl``, or holds no pairs.
        DataFormatError: A line is not JSON, or has neither form (naming its line and fields).
    """
    path = _check_file(path)
    if path.is_dir() or path.suffix != ".jsonl":
        raise ConfigError(f"instructions are read from a .jsonl file (got {str(path)!r})")
    pairs = [
        instruction_pair(row, prompt_field, response_field, f"{str(path)!r} line {number}")
        for number, row in _jsonl_rows(path)
    ]
    if not pairs:
        raise ConfigError(f"{str(path)!r} holds no instruction pairs")
    return pairs


def _dataset_rows(name: str, split: str, config: str | None, data_files: Any, max_docs: int | None) -> Iterable[Any]:
    try:
        import datasets  # optional: imported only when this source is used
    except ImportError:
        raise ConfigError(
            "the 'datasets' source needs the Hugging Face datasets package: pip install datasets"
        ) from None
    try:
        data = datasets.load_dataset(name, config, split=split, data_files=data_files)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"cannot load dataset {name!r} (config {config!r}, split {split!r}): {exc}") from None
    if max_docs is not None:
        data = data.select(range(min(max_docs, len(data))))
    return data


def from_datasets(
    name: str,
    split: str = "train",
    field: str = "text",
    *,
    config: str | None = None,
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
    max_docs: int | None = None,
) -> list[str]:
    """Documents of a Hugging Face ``datasets`` dataset (e.g. ``"json"`` with ``data_files``).

    Args:
        name: Dataset name or builder (``"json"``, ``"text"``, a Hub id).
        split: The split to read.
        field: The column holding the text.
        config: The dataset's configuration name, if it has several.
        data_files: Local files for a builder such as ``"json"``.
        max_docs: Read only the first ``max_docs`` rows.

    Raises:
        ConfigError: ``datasets`` is not installed, or the dataset cannot be loaded.
        DataFormatError: A row lacks ``field``.
    """
    rows = _dataset_rows(name, split, config, data_files, max_docs)
    docs = [
        text.strip() for i, row in enumerate(rows) if (text := _field(row, field, f"dataset {name!r} row {i}")).strip()
    ]
    if not docs:
        raise ConfigError(f"dataset {name!r} split {split!r} holds no text in field {field!r}")
    return docs


def instructions_from_datasets(
    name: str,
    split: str = "train",
    prompt_field: str = "prompt",
    response_field: str = "response",
    *,
    config: str | None = None,
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
    max_docs: int | None = None,
) -> list[tuple[Prompt, str]]:
    """Prompt/response pairs of a ``datasets`` dataset (two columns or a ``messages`` column;
    see :func:`read_instructions`)."""
    rows = _dataset_rows(name, split, config, data_files, max_docs)
    return [
        instruction_pair(row, prompt_field, response_field, f"dataset {name!r} row {i}") for i, row in enumerate(rows)
    ]


def split_documents(docs: Sequence[Any], heldout_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``round(heldout_fraction * n)`` whole documents (at least one when the fraction
    is positive), drawn by ``seed``; both parts keep the documents' original order.

    Returns:
        ``(train, heldout)``: every document is in exactly one of them.

    Raises:
        ConfigError: ``heldout_fraction`` is outside ``[0, 1)`` or leaves no training document.
    """
    check_fraction(heldout_fraction, "heldout_fraction")
    n = len(docs)
    n_out = round(heldout_fraction * n)
    if heldout_fraction > 0 and n_out == 0:
        n_out = 1
    if n_out >= n:
        raise ConfigError(f"heldout_fraction={heldout_fraction} leaves no training document out of {n}")
    perm = torch.randperm(n, generator=make_generator(seed, _HELDOUT_STREAM))  # (n,)
    held = set(perm[:n_out].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]
