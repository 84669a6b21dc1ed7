"""Teacher-output cache for sequences: a causal LM teacher's per-token distributions, stored once.

The teacher runs once over the training token blocks ``x`` ``(N, L)``; students then train from
the stored distributions without running it. Three kinds (layouts in ``token_store``):
``dense`` (full float16 log-probs ``(N, L, V)``, the reference), ``topk`` (the ``k`` most likely
ids, their log-probs and the remaining mass) and ``sampled`` (``draws`` ids drawn with
replacement from the teacher at temperature ``T``, with counts: random-sampling KD, Anshumann
et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", ACL 2025). Sparse
kinds reduce each batch's logits as it is computed; ``(N, L, V)`` is never held in memory.

Every position is stored, ignored ones (label -1) included: the shapes stay ``(N, L, ...)`` and
the loss masks what it skips.

Building. Into ``.<name>.partial`` beside the cache folder: the arrays are preallocated
memory-mapped ``.npy`` files, filled ``chunk_blocks`` blocks at a time; after each chunk they are
flushed and ``progress.json`` (blocks done, accumulated seconds) is written atomically. A build
that stops (an exception, a kill) resumes on the next call from the last complete chunk, and the
teacher is called only for the blocks after it. Draws of a sampled cache come from one generator
per block, seeded by ``(seed, block)``, so a resumed build writes the same bytes as an
uninterrupted one. ``manifest.json`` is written last, then the folder is renamed into place: a
folder without a manifest is not a cache. The manifest records ``build_seconds`` (wall time of
all runs of the build) and ``teacher_tokens_per_s`` (tokens over the time of the teacher calls
and the on-the-fly reduction, disk writes excluded; the reduction syncs a GPU teacher, so the
figure is its real throughput).

Identity. The caller's ``fingerprint`` (teacher weights hash, data fingerprint, its own params)
is combined with this cache's params (kind, k, draws, T, seed, N, L and a hash of ``x``) into
``key``. :func:`open_token_cache` refuses a cache made for another fingerprint
(:class:`CheckpointError`); :func:`load_or_build` keeps one folder per key
(``<root>/<kind>-<key>``), so caches of different teachers or params coexist and a changed
ingredient builds a new one.

DDP. The cache is built by rank 0 only (``build_token_cache`` / ``load_or_build``); the callers
hold the other ranks at a barrier, then every rank opens it with :func:`open_token_cache` and
reads its own rows (memory maps share the OS page cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from darkknowledge.atomic import atomic_write
from darkknowledge.data.cache import cache_dir
from darkknowledge.data.fingerprint import update_with_tensor
from darkknowledge.errors import CheckpointError, ConfigError, ShapeError
from darkknowledge.lm.targets import SparseTargets
from darkknowledge.teachers.token_store import KINDS, Layout

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"

Teacher = Callable[[torch.Tensor], torch.Tensor]
"""Token ids ``(b, L)`` int64 (CPU) -> logits ``(b, L, V)`` on any device."""


def _params(x: torch.Tensor, kind: str, k: int | None, draws: int | None, T: float, seed: int) -> dict[str, Any]:
    """This cache's own ingredients of the key, after checking them."""
    if kind not in KINDS:
        raise ConfigError(f"token cache kind {kind!r} is not one of {KINDS}")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ShapeError(f"token cache inputs must be token blocks (N, L) with N, L >= 1; got {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ConfigError(f"token cache inputs must be integer token ids; got dtype {x.dtype}")
    if kind == "topk" and (k is None or k < 1):
        raise ConfigError(f"a topk token cache needs k >= 1 (got k={k})")
    if kind == "sampled" and (draws is None or draws < 1):
        raise ConfigError(f"a sampled token cache needs draws >= 1 (got draws={draws})")
    if not T > 0:
        raise ConfigError(f"token cache temperature T must be > 0 (got {T})")
    h = hashlib.sha256()
    update_with_tensor(h, x.long())
    return {
        "format": FORMAT,
        "kind": kind,
        "k": k if kind == "topk" else None,
        "draws": draws if kind == "sampled" else None,
        "T": float(T),
        "seed": int(seed) if kind == "sampled" else None,
        "blocks": int(x.shape[0]),
        "length": int(x.shape[1]),
        "x": h.hexdigest()[:20],
    }


def token_cache_key(fingerprint: str, params: dict[str, Any]) -> str:
    """20 hex characters of sha256 over the caller's fingerprint and the cache's own params."""
    text = json.dumps({"fingerprint": fingerprint, **params}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def partial_dir(path: Path) -> Path:
    """Where the cache at ``path`` is built (and resumed from): ``.<name>.partial`` beside it."""
    return path.parent / f".{path.name}.partial"


def _write_json(path: Path, value: dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=1)), binary=False)


def _map(folder: Path, layout: Layout, n: int, length: int, mode: Literal["w+", "r+", "r"]) -> dict[str, np.memmap]:
    """The arrays of ``layout`` in ``folder``: created (``w+``), or opened (``r+``/``r``) and checked."""
    out: dict[str, np.memmap] = {}
    for name, (dtype, per_token) in layout.arrays().items():
        f, shape = folder / f"{name}.npy", (n, length, *per_token)
        if mode == "w+":
            out[name] = np.lib.format.open_memmap(f, mode="w+", dtype=dtype, shape=shape)
            continue
        try:
            a = np.load(f, mmap_mode=mode)
        except (OSError, ValueError, EOFError) as exc:  # missing, truncated or not an array
            raise CheckpointError(f"token cache {folder}: {f.name} is missing or unreadable ({exc})") from None
        if a.shape != shape or a.dtype != dtype:
            raise CheckpointError(
                f"token cache {folder}: {f.name} is {a.dtype}{tuple(a.shape)}, expected {dtype}{shape}"
            )
        out[name] = a
    return out


def _resume_state(tmp: Path, key: str) -> dict[str, Any] | None:
    """The progress of an earlier build of ``key`` in ``tmp`` (None: nothing usable to resume)."""
    try:
        state = json.loads((tmp / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        log.warning("token cache: %s holds a partial build of another cache; starting over", tmp)
        return None
    return state


def build_token_cache(
    teacher: Teacher,
    x: torch.Tensor,
    path: Path,
    *,
    kind: str,
    k: int | None = None,
    draws: int | None = None,
    T: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    fingerprint: str,
    progress: Callable[[int, int], None] | None = None,
    chunk_blocks: int = 256,
) -> TokenCache:
    """Run ``teacher`` over every block of ``x`` and store its distributions at ``path``.

    Args:
        teacher: Token ids ``(b, L)`` int64 (CPU; move them to the teacher's device) -> logits
            ``(b, L, V)``; called under ``torch.inference_mode()``.
        x: Token blocks ``(N, L)``.
        path: The cache folder (replaced if present); built in :func:`partial_dir` and renamed.
        kind: ``dense``, ``topk`` or ``sampled``.
        k: Top-k size (``topk``).
        draws: Draws per token (``sampled``).
        T: Temperature of the stored distributions.
        batch_size: Blocks per teacher call.
        seed: Seed of the draws (``sampled``; block ``i`` uses ``token_store.block_generator(seed, i)``).
        fingerprint: The caller's identity of teacher, data and params; stored and checked on open.
        progress: Called as ``progress(blocks_done, N)`` after each teacher batch.
        chunk_blocks: Blocks between progress records (the unit of resumption).

    Returns:
        The opened cache.
    """
    params = _params(x, kind, k, draws, T, seed)
    return _build(
        teacher,
        x,
        Path(path),
        params,
        fingerprint,
        token_cache_key(fingerprint, params),
        batch_size,
        progress,
        chunk_blocks,
    )


def _build(
    teacher: Teacher,
    x: torch.Tensor,
    path: Path,
    params: dict[str, Any],
    fingerprint: str,
    key: str,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
    chunk_blocks: int,
) -> TokenCache:
    if batch_size < 1 or chunk_blocks < 1:
        raise ConfigError(f"token cache batch_size and chunk_blocks must be >= 1 (got {batch_size}, {chunk_blocks})")
    n, length = params["blocks"], params["length"]
    kind, T, seed = params["kind"], params["T"], params["seed"] or 0
    tmp = partial_dir(path)
    state = _resume_state(tmp, key)
    if state is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {
            "key": key,
            "done": 0,
            "vocab": None,
            "build_seconds": 0.0,
            "teacher_seconds": 0.0,
            "teacher_tokens": 0,
        }
    elif state["done"]:
        log.info("token cache: resuming the build of %s at block %d of %d", path, state["done"], n)
    layout, arrays = None, {}
    if state["vocab"] is not None:
        layout = Layout(kind, state["vocab"], params["k"] or params["draws"] or state["vocab"])
        if not (tmp / MANIFEST).is_file():
            try:
                arrays = _map(tmp, layout, n, length, "r+")
            except CheckpointError as exc:
                log.warning("token cache: cannot resume (%s); starting over", exc)
                shutil.rmtree(tmp)
                return _build(teacher, x, path, params, fingerprint, key, batch_size, progress, chunk_blocks)
    x = x.long()
    for c0 in range(state["done"], n, chunk_blocks):
        c1, started, teacher_s = min(n, c0 + chunk_blocks), time.perf_counter(), 0.0
        for b0 in range(c0, c1, batch_size):
            b1 = min(c1, b0 + batch_size)
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = teacher(x[b0:b1])  # (b, L, V)
                if logits.ndim != 3 or tuple(logits.shape[:2]) != (b1 - b0, length):
                    raise ShapeError(
                        f"the teacher must return logits ({b1 - b0}, {length}, V) for blocks "
                        f"({b1 - b0}, {length}); got {tuple(logits.shape)}"
                    )
                if layout is None:
                    vocab = int(logits.shape[-1])
                    layout = Layout(kind, vocab, params["k"] or params["draws"] or vocab)
                    arrays, state["vocab"] = _map(tmp, layout, n, length, "w+"), vocab
                stored = layout.encode(logits, b0, T, seed)  # {name: (b, L, ...)}
            teacher_s += time.perf_counter() - t0  # forward + reduction (the writes below excluded)
            for name, a in stored.items():
                arrays[name][b0:b1] = a
            if progress is not None:
                progress(b1, n)
        for a in arrays.values():
            a.flush()
        state.update(
            done=c1,
            build_seconds=state["build_seconds"] + time.perf_counter() - started,
            teacher_seconds=state["teacher_seconds"] + teacher_s,
            teacher_tokens=state["teacher_tokens"] + (c1 - c0) * length,
        )
        _write_json(tmp / PROGRESS, state)
    arrays.clear()
    if layout is None:  # unreachable: N >= 1 blocks were computed, now or by the build being resumed
        raise CheckpointError(f"token cache {tmp}: the build computed no blocks")
    if not (tmp / MANIFEST).is_file():
        manifest = {
            **params,
            "vocab": layout.vocab,
            "fingerprint": fingerprint,
            "key": key,
            "arrays": layout.describe(),
            "bytes_per_token": layout.bytes_per_token,
            "build_seconds": state["build_seconds"],
            "teacher_seconds": state["teacher_seconds"],
            "teacher_tokens_per_s": state["teacher_tokens"] / max(state["teacher_seconds"], 1e-9),
        }
        _write_json(tmp / MANIFEST, manifest)  # last: it makes the folder a cache
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    (path / PROGRESS).unlink(missing_ok=True)
    log.info("token cache %s built: %d x %d tokens, %d bytes/token", path, n, length, layout.bytes_per_token)
    return TokenCache(path)


class TokenCache:
    """A built sequence cache, memory-mapped (see the module docstring).

    Args:
        path: The cache folder (``manifest.json`` and the ``.npy`` arrays).

    Raises:
        CheckpointError: The manifest or an array is unreadable, missing or misshapen.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.manifest: dict[str, Any] = json.loads((self.path / MANIFEST).read_text())
            m = self.manifest
            self.kind, self.T, self.vocab = str(m["kind"]), float(m["T"]), int(m["vocab"])
            self.blocks, self.length = int(m["blocks"]), int(m["length"])
            self.layout = Layout(self.kind, self.vocab, int(m["k"] or m["draws"] or self.vocab))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"token cache {self.path}: unreadable manifest ({exc!r})") from None
        self.arrays = _map(self.path, self.layout, self.blocks, self.length, "r")
        self.reused = False

    def __len__(self) -> int:
        return self.blocks

    @property
    def fingerprint(self) -> str:
        """The caller's fingerprint the cache was built for."""
        return str(self.manifest["fingerprint"])

    @property
    def key(self) -> str:
        """Hash of the fingerprint and the cache's own params (the folder name under :func:`load_or_build`)."""
        return str(self.manifest["key"])

    @property
    def bytes_per_token(self) -> int:
        """Stored bytes per token (headers excluded)."""
        return self.layout.bytes_per_token

    def targets(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> SparseTargets | torch.Tensor:
        """The stored distributions of blocks ``idx`` ``(b,)``, on ``device``.

        Returns:
            ``topk`` / ``sampled``: :class:`SparseTargets` with ``b * L`` rows (block-major) and
            ``positions = (b, L)``. ``dense``: float16 log-probabilities ``(b, L, V)`` as stored (the
            token losses widen them to float32 a chunk at a time).
        """
        if idx.ndim != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ShapeError(
                f"token cache rows are read by block indices (b,) of an integer dtype; got "
                f"{idx.dtype}{tuple(idx.shape)}"
            )
        i = idx.cpu().numpy().astype(np.int64)
        if i.size and (i.min() < 0 or i.max() >= self.blocks):
            bad = int(i.min()) if i.min() < 0 else int(i.max())
            raise ConfigError(
                f"token cache block index {bad} is out of range: the cache holds blocks 0..{self.blocks - 1}"
            )
        uniq, inverse = np.unique(i, return_inverse=True)  # sorted: reads move forward through the files
        rows = {}
        for name, a in self.arrays.items():
            got = a[uniq]  # (u, L, ...) a copy of just these blocks
            rows[name] = got if len(uniq) == len(i) and (uniq == i).all() else got[inverse]
        return self.layout.decode(rows, self.T, device)

    def describe(self) -> dict[str, Any]:
        """Facts for the report: kind, size, build cost and where it is."""
        m = self.manifest
        size = sum((self.path / f"{name}.npy").stat().st_size for name in self.arrays)
        return {
            "kind": self.kind,
            "k": m["k"],
            "draws": m["draws"],
            "T": self.T,
            "vocab": self.vocab,
            "blocks": self.blocks,
            "length": self.length,
            "bytes_per_token": self.bytes_per_token,
            "size_mb": round(size / 2**20, 3),
            "build_seconds": round(float(m["build_seconds"]), 3),
            "teacher_tokens_per_s": round(float(m["teacher_tokens_per_s"]), 1),
            "path": str(self.path),
            "reused": self.reused,
        }


def open_token_cache(path: Path, fingerprint: str) -> TokenCache | None:
    """The cache at ``path``, or None when there is none (no folder, or no manifest: an unfinished build).

    Raises:
        CheckpointError: ``path`` holds a cache built for another fingerprint, or a damaged one.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return None
    cache = TokenCache(path)
    if cache.fingerprint != fingerprint:
        raise CheckpointError(
            f"token cache {path} was built for fingerprint {cache.fingerprint!r}, not "
            f"{fingerprint!r} (another teacher, data or params): delete it, build elsewhere, "
            "or use load_or_build, which keeps one folder per fingerprint"
        )
    return cache


def load_or_build(
    teacher: Teacher,
    x: torch.Tensor,
    *,
    kind: str,
    k: int | None = None,
    draws: int | None = None,
    T: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    fingerprint: str,
    root: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    chunk_blocks: int = 256,
) -> TokenCache:
    """The cache ``<root>/<kind>-<key>`` for these ingredients: opened when whole, else built (or resumed).

    ``root`` defaults to ``$DK_CACHE/teacher_tokens``; the other arguments are those of
    :func:`build_token_cache`. A damaged cache is logged and rebuilt.
    """
    params = _params(x, kind, k, draws, T, seed)
    key = token_cache_key(fingerprint, params)
    folder = Path(root if root is not None else cache_dir() / "teacher_tokens") / f"{kind}-{key}"
    try:
        cache = open_token_cache(folder, fingerprint)
        if cache is not None and cache.key == key:
            cache.reused = True
            return cache
    except CheckpointError as exc:
        log.warning("%s; rebuilding it", exc)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "building the %s token cache (%d blocks of %d tokens) in %s", kind, params["blocks"], params["length"], folder
    )
    return _build(teacher, x, folder, params, fingerprint, key, batch_size, progress, chunk_blocks)
