"""Token blocks for causal-LM training: packing, padding with loss masks, chat formatting and a
token cache.

A :class:`TokenBlocks` holds ``N`` rows of ``L`` input ids ``x`` and their next-token targets
``y`` (``y[n, j]`` is the token that follows ``x[n, j]``); ``UNLABELED`` (-1) marks a position
without a target (padding, prompt tokens), which the loss ignores.

* :func:`pack` (plain text, GPT-style packing as in Radford et al., "Language Models are
  Unsupervised Multitask Learners", 2019): documents are concatenated into one stream, each
  followed by EOS, and cut into windows of ``L + 1`` tokens with stride ``L``; window ``k`` is
  ``s[kL : kL + L + 1]``, ``x = window[:-1]``, ``y = window[1:]``. Consecutive windows share
  one token, so every token of the stream but the first is a target exactly once. A window may
  span documents (the EOS between them tells the model where one ends); that is the standard
  practice. The final partial window is dropped.
* :func:`pad_examples` (instruction data): one row per (prompt, response); targets only on the
  response tokens (the prompt's are -1), right padding with -1 targets. Right padding needs no
  attention mask for a causal model: positions before the padding never attend to it.
* :func:`format_instructions`: prompt and response ids through the tokenizer's chat template.
* :func:`tokenize_cached`: tokenise once; the ids are kept on disk keyed by the texts and the
  tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from darkknowledge.atomic import atomic_write
from darkknowledge.data.batch import UNLABELED
from darkknowledge.data.fingerprint import FINGERPRINT_CHARS, update_with_tensor
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.lm.corpus import Prompt

logger = logging.getLogger(__name__)

TOKEN_CACHE_VERSION = 1
"""Part of every token-cache key: bump it when the cached layout or the tokenising rules change."""

TOKENIZE_CHUNK = 1024
"""Texts handed to the tokenizer per call (a fast tokenizer encodes a batch in parallel)."""


@dataclass
class TokenBlocks:
    """Rows of input ids and next-token targets.

    Attributes:
        x: Input ids ``(N, L)`` int64.
        y: Targets ``(N, L)`` int64: the id that follows ``x[n, j]``, or ``UNLABELED`` (-1).
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.x.shape != self.y.shape:
            raise ShapeError(
                f"TokenBlocks needs x and y of one shape (N, L) (got {tuple(self.x.shape)} and {tuple(self.y.shape)})"
            )
        if self.x.dtype != torch.int64 or self.y.dtype != torch.int64:
            raise ShapeError(f"TokenBlocks holds int64 ids (got x {self.x.dtype}, y {self.y.dtype})")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def block_len(self) -> int:
        """``L``: positions per row."""
        return int(self.x.shape[1])

    @property
    def tokens(self) -> int:
        """The number of real targets (positions whose target is not ``UNLABELED``)."""
        return int((self.y != UNLABELED).sum())

    def subset(self, idx: torch.Tensor | Sequence[int]) -> TokenBlocks:
        """The rows ``idx`` (in that order)."""
        idx = torch.as_tensor(idx, dtype=torch.int64)  # (n,)
        return TokenBlocks(self.x.index_select(0, idx), self.y.index_select(0, idx))

    def fingerprint(self) -> str:
        """A short sha256 of the contents (shapes, dtypes and every id)."""
        h = hashlib.sha256()
        update_with_tensor(h, self.x)
        update_with_tensor(h, self.y)
        return h.hexdigest()[:FINGERPRINT_CHARS]

    @staticmethod
    def empty(block_len: int) -> TokenBlocks:
        """Zero rows of width ``block_len``."""
        return TokenBlocks(torch.zeros(0, block_len, dtype=torch.int64), torch.zeros(0, block_len, dtype=torch.int64))


def _check_block_len(block_len: int) -> None:
    if int(block_len) < 1:
        raise ConfigError(f"block_len must be >= 1 token (got {block_len})")


def pack(token_lists: Sequence[Sequence[int]], block_len: int, eos_id: int | None) -> TokenBlocks:
    """Pack documents into full blocks of ``block_len`` positions (see the module docstring).

    Args:
        token_lists: Each document's ids; empty documents are skipped.
        block_len: ``L``.
        eos_id: Appended after each document that does not already end with it (None: the
            documents carry their own separators).

    Returns:
        ``floor((S - 1) / L)`` blocks for a stream of ``S`` tokens; every target is real.
    """
    _check_block_len(block_len)
    pieces = []
    for ids in token_lists:
        if len(ids) == 0:
            continue
        pieces.append(np.asarray(ids, dtype=np.int64))
        if eos_id is not None and int(pieces[-1][-1]) != eos_id:
            pieces.append(np.array([eos_id], dtype=np.int64))
    stream = torch.from_numpy(np.concatenate(pieces)) if pieces else torch.zeros(0, dtype=torch.int64)  # (S,)
    n = max(stream.numel() - 1, 0) // block_len
    if n == 0:
        return TokenBlocks.empty(block_len)
    windows = stream[: n * block_len + 1].unfold(0, block_len + 1, block_len)  # (n, L + 1)
    return TokenBlocks(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())


def pad_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], block_len: int, pad_id: int) -> TokenBlocks:
    """One row per ``(prompt ids, response ids)``, the loss only on the response.

    With ``s = prompt + response`` cut to its first ``L + 1`` tokens (``L = block_len``), a row
    is ``x = s[:-1]``, ``y = s[1:]`` with ``y[j] = -1`` for ``j < len(prompt) - 1`` (targets that
    are prompt tokens), then right padding (``x = pad_id``, ``y = -1``). Rows are as wide as
    the longest kept row (at most ``L``). Examples cut short are counted and logged; examples
    left with no response target (the prompt fills the block, or the response is empty) are
    dropped and counted.

    Raises:
        ConfigError: ``block_len`` is below 1, or no example of a non-empty list keeps a response
            token (no examples at all give zero rows).
    """
    _check_block_len(block_len)
    if not examples:
        return TokenBlocks.empty(block_len)
    rows: list[tuple[list[int], int]] = []
    truncated = dropped = 0
    for prompt, response in examples:
        seq = [*prompt, *response]
        cut = len(seq) > block_len + 1
        seq = seq[: block_len + 1]
        if len(seq) - max(len(prompt), 1) <= 0:  # no response token left as a target
            dropped += 1
            continue
        truncated += cut
        rows.append((seq, len(prompt)))
    if truncated:
        logger.warning(
            "pad_examples: %d of %d examples longer than block_len + 1 = %d tokens were truncated (and kept)",
            truncated,
            len(examples),
            block_len + 1,
        )
    if dropped:
        logger.warning(
            "pad_examples: %d of %d examples were dropped: no response token fits in block_len = %d",
            dropped,
            len(examples),
            block_len,
        )
    if not rows:
        raise ConfigError(
            f"no example keeps a response token within block_len={block_len} (of {len(examples)}); "
            "raise block_len or shorten the prompts"
        )
    width = max(len(seq) - 1 for seq, _ in rows)
    x = torch.full((len(rows), width), int(pad_id), dtype=torch.int64)  # (N, W)
    y = torch.full((len(rows), width), UNLABELED, dtype=torch.int64)  # (N, W)
    for n, (seq, n_prompt) in enumerate(rows):
        ids = torch.tensor(seq, dtype=torch.int64)  # (S,)
        x[n, : len(seq) - 1] = ids[:-1]
        y[n, : len(seq) - 1] = ids[1:]
        y[n, : max(n_prompt - 1, 0)] = UNLABELED
    return TokenBlocks(x, y)


def as_ids(encoded: Any) -> list[int]:
    """A flat id list from what a tokenizer returns: a list, a tensor, a ``BatchEncoding`` or
    dict with ``input_ids`` (transformers 5's ``apply_chat_template``), or a batch of one."""
    if isinstance(encoded, Mapping):  # BatchEncoding is a Mapping too
        encoded = encoded["input_ids"]
    if isinstance(encoded, (torch.Tensor, np.ndarray)):
        encoded = encoded.tolist()
    encoded = list(encoded)
    if len(encoded) == 1 and isinstance(encoded[0], (list, tuple)):
        encoded = list(encoded[0])
    return [int(i) for i in encoded]


def _messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def format_instructions(pairs: Sequence[tuple[Prompt, str]], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, response ids)`` of each pair through the tokenizer's chat template.

    The prompt ids are the template applied to the prompt's messages with the generation
    prompt (``add_generation_prompt=True``); the response ids are the ids of the whole
    conversation (prompt and assistant message) after that prefix, cut after the last EOS
    (``tokenizer.eos_token_id``, the end-of-turn token of chat models) when it holds one.

    Args:
        pairs: ``(prompt, response)``; a prompt is a user message's text or a list of messages.
        tokenizer: A Hugging Face tokenizer with a ``chat_template``.

    Raises:
        ConfigError: The tokenizer has no chat template, or its template does not give the
            prompt's ids as a prefix of the conversation's (the response could not be cut off).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "instruction data needs a tokenizer with a chat template (tokenizer.chat_template is "
            "unset); use an instruct model's tokenizer or set chat_template"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for i, (prompt, response) in enumerate(pairs):
        messages = _messages(prompt)
        prompt_ids = as_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        full = as_ids(
            tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=True)
        )
        if full[: len(prompt_ids)] != prompt_ids:
            raise ConfigError(
                f"pair {i}: the chat template does not keep the prompt's ids as a prefix of the "
                "conversation's (prompt with add_generation_prompt=True vs prompt + response), so the "
                "response tokens cannot be told apart; use a template that renders the assistant turn "
                "after the generation prompt"
            )
        reply = full[len(prompt_ids) :]
        if eos is not None and eos in reply:
            reply = reply[: len(reply) - reply[::-1].index(eos)]
        out.append((prompt_ids, reply))
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what decides a tokenizer's ids: its serialised model (vocabulary, merges,
    normaliser, added tokens; truncation and padding settings left out), else its vocabulary."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(getattr(tokenizer, "eos_token_id", None)).encode())
    return h.hexdigest()[:FINGERPRINT_CHARS]


def texts_fingerprint(texts: Sequence[str]) -> str:
    """A short hash of a list of texts (order and boundaries included)."""
    h = hashlib.sha256(str(len(texts)).encode())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:FINGERPRINT_CHARS]


def token_cache_path(texts: Sequence[str], tokenizer: Any, cache_dir: str | Path, add_eos: bool = True) -> Path:
    """The file :func:`tokenize_cached` keeps these texts' ids in."""
    key = hashlib.sha256(
        repr((TOKEN_CACHE_VERSION, texts_fingerprint(texts), tokenizer_fingerprint(tokenizer), bool(add_eos))).encode()
    ).hexdigest()[:FINGERPRINT_CHARS]
    return Path(cache_dir).expanduser() / f"tokens-{key}.npz"


def _split(ids: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    flat = ids.tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _load(path: Path, n: int) -> list[list[int]] | None:
    try:
        with np.load(path) as f:
            ids, offsets = f["ids"], f["offsets"]
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("token cache %s is unreadable (%s); tokenising again", path, exc)
        return None
    if offsets.shape != (n + 1,) or int(offsets[-1]) != ids.shape[0]:
        logger.warning("token cache %s does not match its %d texts; tokenising again", path, n)
        return None
    return _split(ids, offsets)


def tokenize_cached(
    texts: Sequence[str],
    tokenizer: Any,
    cache_dir: str | Path | None,
    add_eos: bool = True,
) -> list[list[int]]:
    """Each text's ids (no special tokens added, EOS appended with ``add_eos``), read from
    the disk cache when these texts met this tokenizer before.

    The cache file (``tokens-<key>.npz``: ``ids`` int32 concatenated, ``offsets`` int64 ``(n + 1,)``)
    is keyed by :func:`texts_fingerprint`, :func:`tokenizer_fingerprint`, ``add_eos`` and
    ``TOKEN_CACHE_VERSION``, and written atomically.

    Args:
        texts: The documents.
        tokenizer: A Hugging Face tokenizer (called as ``tokenizer(list_of_texts, add_special_tokens=False)``).
        cache_dir: Folder of the cache files; None: no cache.
        add_eos: Append ``tokenizer.eos_token_id`` to every document.

    Raises:
        ConfigError: ``add_eos`` with a tokenizer that has no EOS token.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ConfigError(
            "add_eos needs a tokenizer with an EOS token (tokenizer.eos_token_id is None); set "
            "tokenizer.eos_token or pass add_eos=False"
        )
    path = None if cache_dir is None else token_cache_path(texts, tokenizer, cache_dir, add_eos)
    if path is not None and path.is_file():
        cached = _load(path, len(texts))
        if cached is not None:
            logger.info("token cache hit: %s (%d texts)", path, len(texts))
            return cached
    out: list[list[int]] = []
    tail: list[int] = [eos] if add_eos and eos is not None else []  # eos is set with add_eos: checked above
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = list(texts[start : start + TOKENIZE_CHUNK])
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            out.append([*ids, *tail])
    if path is not None:
        lengths = np.array([len(ids) for ids in out], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (n + 1,)
        flat = np.fromiter((i for ids in out for i in ids), dtype=np.int64, count=int(offsets[-1]))
        dtype = np.int32 if flat.size == 0 or int(flat.max()) < 2**31 else np.int64
        atomic_write(path, lambda f: np.savez(f, ids=flat.astype(dtype), offsets=offsets))
        logger.info("token cache written: %s (%d texts, %d tokens)", path, len(texts), flat.size)
    return out
