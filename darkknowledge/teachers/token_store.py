"""On-disk layout of a teacher's per-token distributions (the sequence cache's arrays).

One ``.npy`` file per array, each ``(N, L, ...)`` over ``N`` token blocks of length ``L``,
memory-mapped for reading. Per token (``V`` the vocabulary, ``k`` the top-k size, ``d`` the
number of draws):

* ``dense``: ``logp`` ``(V,)`` float16, the full ``log_softmax(z / T)``: ``2 V`` bytes.
* ``topk``: ``ids`` ``(k,)`` uint16 (int32 when ``V > 65536``), ``logp`` ``(k,)`` float16 and
  ``tail`` ``()`` float32: ``k (2 + 2) + 4`` bytes (``k = 64``: 260).
* ``sampled``: ``d`` draws with replacement from ``softmax(z / T)`` (Anshumann et al., "Sparse
  Logit Sampling: Accelerating Knowledge Distillation in LLMs", ACL 2025): ``ids`` ``(d,)``,
  ``counts`` ``(d,)`` uint8 (uint16 when ``d > 255``), ``logp`` ``(d,)`` float16 and ``tail``
  float32: ``d (2 + 1 + 2) + 4`` bytes (``d = 48``: 244). The distinct ids fill the first slots;
  unused slots hold id 0, count 0 and ``logp = -inf``.

``tail`` is the log of the mass outside the listed ids, computed from the float32 log-probs
before they are rounded to float16 (so it is the teacher's own, not the rounded values'). A
float16 log-probability carries a relative error of at most ``2^-11`` (``|logp| < 8``: under
``0.004`` absolute, i.e. under 0.4 % on the probability).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from darkknowledge.data.seeds import make_generator
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.lm.targets import SparseTargets, sampled_targets, topk_targets

KINDS = ("dense", "topk", "sampled")
TOKEN_SAMPLE_STREAM = 5
"""Stream tag of the per-block draws of a sampled cache (``cache.py`` uses 3 and 4)."""


def id_dtype(vocab: int) -> np.dtype:
    """Storage dtype of token ids: uint16 when every id ``< vocab`` fits (``vocab <= 65536``), else int32."""
    return np.dtype(np.uint16) if vocab <= 2**16 else np.dtype(np.int32)


def count_dtype(draws: int) -> np.dtype:
    """Storage dtype of draw counts (at most ``draws``): uint8, uint16 or int32."""
    if draws <= 255:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if draws <= 65535 else np.dtype(np.int32)


def block_generator(seed: int, block: int) -> torch.Generator:
    """The CPU generator of block ``block``'s draws: a function of ``(seed, block)`` only, so a
    resumed or re-ordered build draws exactly what an uninterrupted one draws."""
    return make_generator(seed, block, TOKEN_SAMPLE_STREAM)


@dataclass(frozen=True)
class Layout:
    """Which arrays a cache of one kind holds, with their dtypes and per-token shapes.

    Attributes:
        kind: ``dense``, ``topk`` or ``sampled``.
        vocab: The teacher's vocabulary size ``V``.
        slots: Values per token: ``V`` (dense), ``k`` (topk) or the number of draws (sampled).
    """

    kind: str
    vocab: int
    slots: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"token cache kind {self.kind!r} is not one of {KINDS}")
        if self.vocab < 1:
            raise ShapeError(f"the teacher's vocabulary size must be >= 1 (got {self.vocab})")
        if self.kind == "topk" and not 1 <= self.slots <= self.vocab:
            raise ConfigError(f"token cache k={self.slots} must be between 1 and the vocabulary size {self.vocab}")
        if self.kind == "sampled" and self.slots < 1:
            raise ConfigError(f"token cache draws={self.slots} must be >= 1")

    def arrays(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """``{name: (dtype, per-token shape)}`` of the stored arrays."""
        f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
        if self.kind == "dense":
            return {"logp": (f16, (self.vocab,))}
        ids = (id_dtype(self.vocab), (self.slots,))
        if self.kind == "topk":
            return {"ids": ids, "logp": (f16, (self.slots,)), "tail": (f32, ())}
        return {
            "ids": ids,
            "counts": (count_dtype(self.slots), (self.slots,)),
            "logp": (f16, (self.slots,)),
            "tail": (f32, ()),
        }

    @property
    def bytes_per_token(self) -> int:
        """Stored bytes per token over all arrays."""
        return sum(dt.itemsize * math.prod(shape) for dt, shape in self.arrays().values())

    def describe(self) -> dict[str, dict[str, object]]:
        """The layout as JSON for the manifest: ``{name: {"dtype", "per_token"}}``."""
        return {n: {"dtype": dt.str, "per_token": list(s)} for n, (dt, s) in self.arrays().items()}

    # ------------------------------------------------------------ writing
    def encode(self, logits: torch.Tensor, first_block: int, T: float, seed: int) -> dict[str, np.ndarray]:
        """Reduce a batch of teacher logits ``(b, L, V)`` (blocks ``first_block ..``) to the stored arrays.

        Returns:
            ``{name: (b, L, ...)}`` numpy arrays in the storage dtypes.
        """
        b, length, vocab = logits.shape
        if vocab != self.vocab:
            raise ShapeError(f"the teacher returned {vocab} logits per token after {self.vocab} in earlier batches")
        if self.kind == "dense":
            logp = torch.log_softmax(logits.float() / T, dim=-1)  # (b, L, V)
            return {"logp": logp.to(torch.float16).cpu().numpy()}
        if self.kind == "topk":
            t = topk_targets(logits, self.slots, T)  # rows (b*L, k)
            ids, logp, tail, counts = t.ids, t.logp, t.tail, None
        else:  # one generator per block: a block's draws do not depend on its batch
            parts = [
                sampled_targets(logits[j].float().cpu(), self.slots, T, block_generator(seed, first_block + j))
                for j in range(b)
            ]  # each rows (L, d)
            ids = torch.cat([p.ids for p in parts])  # (b*L, d)
            logp = torch.cat([p.logp for p in parts])  # (b*L, d)
            tail = torch.cat([p.tail for p in parts])  # (b*L,)
            weights = cast("list[torch.Tensor]", [p.weights for p in parts])  # sampled targets carry weights
            counts = torch.cat(weights) * self.slots  # (b*L, d) integer-valued
        dt = self.arrays()
        out = {
            "ids": ids.cpu().numpy().astype(dt["ids"][0]).reshape(b, length, self.slots),
            "logp": logp.to(torch.float16).cpu().numpy().reshape(b, length, self.slots),
            "tail": tail.float().cpu().numpy().reshape(b, length),
        }
        if counts is not None:
            out["counts"] = counts.round().cpu().numpy().astype(dt["counts"][0]).reshape(b, length, self.slots)
        return out

    # ------------------------------------------------------------ reading
    def decode(self, rows: dict[str, np.ndarray], T: float, device: torch.device | str) -> SparseTargets | torch.Tensor:
        """Stored rows ``{name: (b, L, ...)}`` as targets on ``device``.

        Returns:
            ``dense``: float16 log-probabilities ``(b, L, V)`` as stored. Sparse kinds: :class:`SparseTargets`
            with ``b * L`` rows and ``positions = (b, L)``; ``ids`` int64, ``logp`` and ``tail``
            float32, ``weights`` (sampled) counts / draws.
        """

        # move the compact dtypes and widen on the device (a quarter of the bytes to copy for ids)
        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        if self.kind == "dense":  # kept in float16: a loss widens one chunk of rows at a time
            return put(rows["logp"])  # (b, L, V)
        logp = put(rows["logp"]).float()  # (b, L, slots)
        b, length = logp.shape[:2]
        raw = rows["ids"]
        ids = (
            put(raw.astype(np.int32) if raw.dtype == np.uint16 else raw).long().reshape(b * length, self.slots)
        )  # (bL, k)
        weights = None
        if self.kind == "sampled":
            weights = put(rows["counts"]).float().reshape(b * length, self.slots) / self.slots  # (bL, d)
        return SparseTargets(
            ids,
            logp.reshape(b * length, self.slots),
            put(rows["tail"]).reshape(b * length),
            weights,
            T,
            self.vocab,
            self.kind,
            (b, length),
        )
