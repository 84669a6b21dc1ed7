"""A bounded pool of synthetic inputs, on disk (or in memory), that resumes exactly.

A synthesiser that makes inputs slowly (DeepInversion optimises each batch for thousands of
steps) keeps what it made and lets the student train on draws from the last ``capacity``
samples. The pool is a FIFO of *chunks*, one per added batch, numbered ``seq = 1, 2, ...``:

* ``count`` (a long buffer of this module: it is checkpointed with the module that owns the
  pool, e.g. in ``last.pt``) is the number of chunks added so far;
* the *visible* window is the chunks with ``count - capacity_chunks < seq <= count``, where
  ``capacity_chunks = capacity // chunk_size`` (``chunk_size``: rows of one added batch);
* ``add`` writes chunk ``count + 1`` and increments ``count``; a chunk file whose ``seq`` is
  above the loaded ``count`` (written by a run killed after its last checkpoint) is therefore
  never seen, and is overwritten when that ``seq`` is added again;
* ``commit(count)`` (after each checkpoint write, ``Task.saved``) deletes the chunks that no
  resume can see any more (``seq <= count - capacity_chunks``) and records ``count`` in
  ``pool.json``; nothing else ever deletes a chunk.

So after a resume (the buffer loaded from the checkpoint) the pool sees exactly the chunks it
saw when that checkpoint was written, and an interrupted run continues as the uninterrupted
one would have.

Directory layout::

    pool.json              {"format", "version", "input_shape", "dtype", "capacity",
                            "chunk_size", "teacher", "committed"}
    chunk-00000001.pt      {"x": (chunk_size, *input_shape), "seq": 1}   (atomic writes)
    ...

A directory made for another teacher (hash), input shape, dtype, capacity or batch size is
refused with an error that asks for a new directory. ``SamplePool.open(path)`` reads an
existing directory (read-only: its committed window) for reuse across runs. Without a
directory the chunks live in memory with the same semantics (nothing survives the process).
Loaded chunks are cached in host memory (the visible ones).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkknowledge.atomic import atomic_write
from darkknowledge.engine.checkpoint import atomic_save, safe_load
from darkknowledge.errors import CheckpointError, ConfigError, ShapeError

__all__ = ["POOL_FORMAT", "SamplePool"]

POOL_FORMAT = "darkknowledge-sample-pool"
_VERSION = 1
_META = "pool.json"
_CHUNK = re.compile(r"^chunk-(\d{8,})\.pt$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _chunk_name(seq: int) -> str:
    return f"chunk-{seq:08d}.pt"


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ConfigError(f"sample pool dtype {dtype} is not supported; valid: {', '.join(_DTYPES)}")


class SamplePool(nn.Module):
    """A bounded FIFO of input batches (see the module docstring).

    Args:
        capacity: Samples kept visible at most (rounded down to whole chunks; at least one
            added batch must fit).
        input_shape: One sample's shape, e.g. ``(3, 32, 32)`` or ``(1, 40)``.
        directory: Where chunks are written (None: in memory). See also :meth:`bind`.
        teacher_hash: Identifies what the samples were made from; a directory made with
            another one is refused.
        dtype: Storage dtype of the samples (``add`` casts to it; ``sample`` returns it).

    Attributes:
        count: 0-d long buffer: chunks added so far (checkpointed with the owning module).
        chunk_size: Rows of each chunk (None until the first ``add`` or a directory's ``pool.json``).
        read_only: True for a pool from :meth:`open`.
    """

    count: torch.Tensor

    def __init__(
        self,
        capacity: int,
        input_shape: tuple[int, ...],
        directory: str | Path | None = None,
        teacher_hash: str = "",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if int(capacity) < 1:
            raise ConfigError(f"sample pool capacity must be >= 1 sample (got {capacity})")
        self.capacity = int(capacity)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dtype = dtype
        _dtype_name(dtype)
        self.teacher_hash = str(teacher_hash)
        self.chunk_size: int | None = None
        self.directory: Path | None = None
        self.read_only = False
        self._chunks: dict[int, torch.Tensor] = {}  # seq -> (chunk_size, *input_shape): memory store / file cache
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        if directory is not None:
            self.bind(directory, teacher_hash)

    # ---------------------------------------------------------------- storage

    def bind(self, directory: str | Path, teacher_hash: str | None = None) -> None:
        """Keep the chunks in ``directory`` from now on (made if missing; checked if not).

        Call before the first ``add`` of this process (the count, e.g. loaded from a
        checkpoint, may already be above 0: its chunks are read from the directory).

        Raises:
            ConfigError: Chunks were added in memory already; ``directory`` holds a pool made
                with another teacher, input shape, dtype, capacity or batch size, or something
                that is not a sample pool.
        """
        if self._chunks and self.directory is None:
            raise ConfigError("bind the sample pool to its directory before adding samples to it")
        if teacher_hash is not None:
            self.teacher_hash = str(teacher_hash)
        path = Path(directory)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"sample pool directory {str(path)!r} is a file; choose a directory")
        self.directory = path
        self._chunks = {}
        meta = self._read_meta(path)
        if meta is None:
            self._write_meta(committed=0)
            return
        self._check_meta(meta, path)
        self.chunk_size = meta["chunk_size"]

    @classmethod
    def open(cls, directory: str | Path, teacher_hash: str | None = None) -> SamplePool:
        """An existing pool directory, read-only: its committed chunks are visible.

        Args:
            directory: A directory written by a :class:`SamplePool`.
            teacher_hash: When given, the pool must have been made with this teacher.

        Raises:
            ConfigError: No pool there, or one made with another teacher.
        """
        path = Path(directory)
        meta = cls._read_meta(path)
        if meta is None:
            raise ConfigError(f"{str(path)!r} holds no sample pool ({_META} is missing)")
        pool = cls(meta["capacity"], tuple(meta["input_shape"]), None, meta["teacher"], _DTYPES[meta["dtype"]])
        if teacher_hash is not None and str(teacher_hash) != meta["teacher"]:
            raise ConfigError(
                f"sample pool {str(path)!r} was made with teacher {meta['teacher']!r}, not "
                f"{teacher_hash!r}; use a pool made with this teacher (or a new directory)"
            )
        pool.directory = path
        pool.chunk_size = meta["chunk_size"]
        pool.count.fill_(int(meta["committed"]))
        pool.read_only = True
        return pool

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any] | None:
        file = path / _META
        if not file.is_file():
            if path.is_dir() and any(_CHUNK.match(p.name) for p in path.iterdir()):
                raise ConfigError(
                    f"{str(path)!r} holds chunk files but no {_META}: it is not a whole sample pool; "
                    "choose a new directory"
                )
            return None
        try:
            meta = json.loads(file.read_text())
            ok = meta.get("format") == POOL_FORMAT and meta.get("dtype") in _DTYPES
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise ConfigError(f"{str(file)!r} is not a darkknowledge sample pool's {_META}; choose a new directory")
        return meta

    def _check_meta(self, meta: dict[str, Any], path: Path) -> None:
        mine = {
            "teacher": self.teacher_hash,
            "input_shape": list(self.input_shape),
            "dtype": _dtype_name(self.dtype),
            "capacity": self.capacity,
        }
        for key, value in mine.items():
            if meta.get(key) != value:
                raise ConfigError(
                    f"sample pool directory {str(path)!r} was made with {key} {meta.get(key)!r}, this run has "
                    f"{value!r}: its samples do not belong to this run. Choose a new directory (or delete that one)"
                )
        if self.chunk_size is not None and meta.get("chunk_size") not in (None, self.chunk_size):
            raise ConfigError(
                f"sample pool directory {str(path)!r} holds batches of {meta['chunk_size']}, this run "
                f"adds batches of {self.chunk_size}; choose a new directory"
            )

    def _write_meta(self, committed: int) -> None:
        assert self.directory is not None
        meta = {
            "format": POOL_FORMAT,
            "version": _VERSION,
            "input_shape": list(self.input_shape),
            "dtype": _dtype_name(self.dtype),
            "capacity": self.capacity,
            "chunk_size": self.chunk_size,
            "teacher": self.teacher_hash,
            "committed": int(committed),
        }
        text = json.dumps(meta, indent=1) + "\n"
        atomic_write(self.directory / _META, lambda f: f.write(text), binary=False)

    def _committed(self) -> int:
        meta = self._read_meta(self.directory) if self.directory is not None else None
        return int(meta["committed"]) if meta else 0

    # ---------------------------------------------------------------- window

    @property
    def capacity_chunks(self) -> int:
        """Chunks in the visible window (0 before the chunk size is known)."""
        return self.capacity // self.chunk_size if self.chunk_size else 0

    def visible(self) -> list[int]:
        """The ``seq`` of the visible chunks, oldest first (memory mode: those still held)."""
        count = int(self.count)
        seqs = list(range(max(1, count - self.capacity_chunks + 1), count + 1)) if self.chunk_size else []
        if self.directory is None:
            seqs = [s for s in seqs if s in self._chunks]
        return seqs

    def __len__(self) -> int:
        """Visible samples."""
        return len(self.visible()) * (self.chunk_size or 0)

    def _writable(self) -> None:
        if self.read_only:
            raise ConfigError(f"sample pool {str(self.directory)!r} was opened read-only (SamplePool.open)")

    def add(self, x: torch.Tensor) -> None:
        """Append one batch as chunk ``count + 1`` (written atomically) and increment ``count``.

        Args:
            x: ``(chunk_size, *input_shape)``; every added batch has the same number of rows.

        Raises:
            ShapeError: ``x`` has another sample shape or number of rows than the pool's.
            ConfigError: One batch is larger than the capacity; the pool is read-only.
        """
        self._writable()
        if tuple(x.shape[1:]) != self.input_shape or x.dim() < 1:
            raise ShapeError(
                f"sample pool holds inputs of shape {self.input_shape}; got a batch of shape {tuple(x.shape)}"
            )
        rows = int(x.shape[0])
        if self.chunk_size is None:
            if rows > self.capacity:
                raise ConfigError(
                    f"sample pool capacity ({self.capacity} samples) must hold at least one batch "
                    f"({rows} samples); raise pool_size"
                )
            self.chunk_size = rows
            if self.directory is not None:
                self._write_meta(self._committed())
        elif rows != self.chunk_size:
            raise ShapeError(f"sample pool chunks hold {self.chunk_size} samples; got a batch of {rows}")
        seq = int(self.count) + 1
        chunk = x.detach().to(device="cpu", dtype=self.dtype).contiguous().clone()  # (chunk_size, *input_shape)
        if self.directory is not None:
            atomic_save({"x": chunk, "seq": seq}, self.directory / _chunk_name(seq))
        self._chunks[seq] = chunk
        self.count.fill_(seq)
        if self.directory is not None:  # the cache keeps visible chunks only; the files stay until commit
            low = seq - self.capacity_chunks
            for old in [s for s in self._chunks if s <= low]:
                del self._chunks[old]

    def _load(self, seq: int) -> torch.Tensor:
        chunk = self._chunks.get(seq)
        if chunk is not None:
            return chunk
        assert self.directory is not None
        path = self.directory / _chunk_name(seq)
        hint = (
            f"The sample pool {str(self.directory)!r} is missing chunks its checkpoint counts on; "
            "delete the run's last.pt to start the stage again, or point the pool at a new directory."
        )
        if not path.is_file():
            raise CheckpointError(f"sample pool chunk {str(path)!r} is missing. {hint}")
        payload = safe_load(path, hint=hint)
        chunk = payload.get("x")
        expected = (self.chunk_size, *self.input_shape)
        if not isinstance(chunk, torch.Tensor) or tuple(chunk.shape) != expected or payload.get("seq") != seq:
            raise CheckpointError(
                f"sample pool chunk {str(path)!r} does not hold batch {seq} of shape {expected}. {hint}"
            )
        chunk = chunk.to(self.dtype)
        self._chunks[seq] = chunk
        return chunk

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples drawn uniformly (with replacement) from the visible ones.

        Args:
            n: How many.
            generator: A CPU generator (the same generator state draws the same samples).

        Returns:
            ``(n, *input_shape)`` on the CPU, in the pool's dtype.

        Raises:
            ConfigError: The pool has no visible sample.
        """
        seqs = self.visible()
        if not seqs:
            raise ConfigError("the sample pool is empty: add a batch before sampling from it")
        assert self.chunk_size is not None  # set by the first add
        cs = int(self.chunk_size)
        idx = torch.randint(len(seqs) * cs, (int(n),), generator=generator)  # (n,) over visible samples
        which, row = idx // cs, idx % cs  # (n,), (n,)
        out = torch.empty((int(n), *self.input_shape), dtype=self.dtype)
        for k in torch.unique(which).tolist():
            mask = which == k
            out[mask] = self._load(seqs[k])[row[mask]]
        return out

    def commit(self, count: int | None = None) -> None:
        """Drop the chunks no resume from ``count`` can see (``seq <= count - capacity_chunks``).

        Call after the checkpoint that holds ``count`` is written (default: the current count).
        Also removes what a killed run left (temp files, chunks above the current count, which
        no resume reads before overwriting them) and records ``count`` as committed.
        """
        self._writable()
        c = int(self.count) if count is None else int(count)
        low = c - self.capacity_chunks if self.chunk_size else 0
        for old in [s for s in self._chunks if s <= low]:
            del self._chunks[old]
        if self.directory is None:
            return
        current = int(self.count)
        for path in self.directory.iterdir():
            m = _CHUNK.match(path.name)
            unreachable = m is not None and not low < int(m.group(1)) <= current  # old, or a killed run's extra
            leftover = path.name.startswith(".chunk-") and path.name.endswith(".tmp")  # a killed atomic write
            if unreachable or leftover:
                path.unlink(missing_ok=True)
        self._write_meta(committed=c)

    def extra_repr(self) -> str:
        where = str(self.directory) if self.directory is not None else "memory"
        return f"capacity={self.capacity}, input_shape={self.input_shape}, chunk_size={self.chunk_size}, in={where}"
