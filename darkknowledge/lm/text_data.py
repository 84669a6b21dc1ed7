"""One entry point from a text source to train and held-out token blocks.

Sources (``source``):

* ``builtin``: the standard library's docstrings (:func:`darkknowledge.lm.corpus.builtin_corpus`).
* ``text``: a local ``.txt`` / ``.jsonl`` file or a folder of ``.txt`` files (``path``).
* ``instructions``: prompt/response pairs from JSONL (``path``), padded with loss masks.
* ``datasets``: a Hugging Face ``datasets`` dataset named ``path`` (``data_files`` for local
  files), text or (``instruction=True``) prompt/response pairs.

Documents are split into train and held-out first (whole documents, seeded), then tokenised:
plain text through the token cache and :func:`darkknowledge.lm.tokens.pack`, instructions
through the chat template and :func:`darkknowledge.lm.tokens.pad_examples`. The cache is keyed
by all documents (not by the split), so a new seed or held-out fraction reuses it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from darkknowledge.data.cache import cache_dir as default_cache_dir
from darkknowledge.errors import ConfigError, did_you_mean
from darkknowledge.lm import corpus
from darkknowledge.lm.tokens import (
    TokenBlocks,
    format_instructions,
    pack,
    pad_examples,
    token_cache_path,
    tokenize_cached,
)

logger = logging.getLogger(__name__)

SOURCES = ("builtin", "text", "instructions", "datasets")
"""The valid ``source`` values of :func:`load_text_data`."""


def _documents(
    source: str,
    path: str | Path | None,
    instruction: bool,
    max_docs: int | None,
    text_field: str,
    prompt_field: str,
    response_field: str,
    split: str,
    config: str | None,
    data_files: Any,
) -> list[Any]:
    """The documents (texts, or ``(prompt, response)`` pairs with ``instruction``) of ``source``."""
    if source == "builtin":
        if instruction:
            raise ConfigError(
                "source 'builtin' is plain text; instruction=True needs source 'instructions' or 'datasets'"
            )
        return corpus.builtin_corpus(max_docs)
    if path is None:
        raise ConfigError(
            f"source {source!r} needs path ("
            + ("the dataset name" if source == "datasets" else "a file or folder")
            + ")"
        )
    if source == "datasets":
        if instruction:
            docs: list[Any] = corpus.instructions_from_datasets(
                str(path), split, prompt_field, response_field, config=config, data_files=data_files, max_docs=max_docs
            )
        else:
            docs = corpus.from_datasets(
                str(path), split, text_field, config=config, data_files=data_files, max_docs=max_docs
            )
    elif instruction:
        docs = corpus.read_instructions(path, prompt_field, response_field)
    else:
        docs = corpus.read_text(path, text_field)
    return docs[:max_docs] if max_docs is not None else docs


def load_text_data(
    source: str,
    tokenizer: Any,
    *,
    block_len: int,
    heldout_fraction: float,
    seed: int,
    cache_dir: str | Path | None = None,
    path: str | Path | None = None,
    instruction: bool = False,
    max_docs: int | None = None,
    text_field: str = "text",
    prompt_field: str = "prompt",
    response_field: str = "response",
    pad_id: int | None = None,
    split: str = "train",
    config: str | None = None,
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
) -> tuple[TokenBlocks, TokenBlocks, dict[str, Any]]:
    """Train and held-out token blocks of a text source.

    Args:
        source: One of ``SOURCES`` (``instructions`` implies ``instruction=True``).
        tokenizer: A Hugging Face tokenizer (a chat template for instruction data, an EOS
            token for plain text).
        block_len: Positions per row ``L``.
        heldout_fraction: Share of documents held out, in ``[0, 1)``.
        seed: Seed of the held-out draw.
        cache_dir: Folder of the token cache; None: ``$DK_CACHE/lm-tokens``.
        path: The file or folder (``text``, ``instructions``), or the dataset name (``datasets``).
        instruction: Read prompt/response pairs (loss on the response only) instead of text.
        max_docs: Keep the first ``max_docs`` documents (or pairs).
        text_field: JSONL / dataset field of the text.
        prompt_field: Field of the prompt (or a ``messages`` list, see ``read_instructions``).
        response_field: Field of the response.
        pad_id: Input id of padding (instruction rows); None: the tokenizer's pad token, else
            its EOS, else 0 (padding is never a target, so its id only needs to be valid).
        split: Dataset split (``datasets``).
        config: Dataset configuration (``datasets``).
        data_files: Local files of a ``datasets`` builder such as ``"json"``.

    Returns:
        ``(train, heldout, description)``; ``description`` holds ``source``, ``path``,
        ``instruction``, ``block_len``, ``documents``, ``tokens`` (real targets) and ``blocks``
        (each ``{"train": n, "heldout": n}``), ``cache_file``, ``cache_bytes`` and ``seconds``.

    Raises:
        ConfigError: Unknown source, a missing path, or too little text for one training block.
    """
    started = time.perf_counter()
    if source not in SOURCES:
        raise ConfigError(f"unknown text source {source!r}; valid: {list(SOURCES)}.{did_you_mean(source, SOURCES)}")
    if int(block_len) < 1:
        raise ConfigError(f"block_len must be >= 1 token (got {block_len})")
    if max_docs is not None and max_docs < 1:
        raise ConfigError(f"max_docs must be >= 1 or None (got {max_docs})")
    instruction = instruction or source == "instructions"
    docs = _documents(
        source, path, instruction, max_docs, text_field, prompt_field, response_field, split, config, data_files
    )
    train_i, held_i = corpus.split_documents(range(len(docs)), heldout_fraction, seed)
    cache_file: Path | None = None
    if instruction:
        examples = format_instructions(docs, tokenizer)
        if pad_id is None:
            pad_id = next(
                (
                    i
                    for i in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                    if i is not None
                ),
                0,
            )
        train = pad_examples([examples[i] for i in train_i], block_len, pad_id)
        held = pad_examples([examples[i] for i in held_i], block_len, pad_id)
    else:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "lm-tokens"
        ids = tokenize_cached(docs, tokenizer, folder, add_eos=True)
        cache_file = token_cache_path(docs, tokenizer, folder, add_eos=True)
        train = pack([ids[i] for i in train_i], block_len, tokenizer.eos_token_id)
        held = pack([ids[i] for i in held_i], block_len, tokenizer.eos_token_id)
        if len(train) == 0:
            total = sum(len(ids[i]) for i in train_i)
            raise ConfigError(
                f"the training documents hold {total} tokens, too few for one block of block_len="
                f"{block_len} (+1); lower block_len or add text"
            )
    if held_i and len(held) == 0:
        logger.warning(
            "load_text_data: the %d held-out documents fill no block of block_len=%d; held-out set is empty",
            len(held_i),
            block_len,
        )
    description = {
        "source": source,
        "path": None if path is None else str(path),
        "instruction": instruction,
        "block_len": int(block_len),
        "documents": {"train": len(train_i), "heldout": len(held_i)},
        "tokens": {"train": train.tokens, "heldout": held.tokens},
        "blocks": {"train": len(train), "heldout": len(held)},
        "cache_file": None if cache_file is None else str(cache_file),
        "cache_bytes": cache_file.stat().st_size if cache_file is not None and cache_file.is_file() else 0,
        "seconds": round(time.perf_counter() - started, 3),
    }
    logger.info(
        "text data %s: %d + %d documents -> %d + %d blocks of %d (%d training targets) in %.1f s",
        source,
        len(train_i),
        len(held_i),
        len(train),
        len(held),
        block_len,
        train.tokens,
        description["seconds"],
    )
    return train, held, description
