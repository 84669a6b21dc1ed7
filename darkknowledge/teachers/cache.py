"""Teacher-output cache: a frozen teacher's outputs computed once, then read by sample index.

In offline distillation the teacher's forward pass is pure overhead. The cache stores
exactly what the objective reads from the teacher (logits and/or tapped features) for every
training sample, in a compact dtype, and the student trains from it without running the
teacher at all.

Identity. A cache lives in ``$DK_CACHE/teacher_outputs/<key>/`` where the key hashes the
teacher's weights, the training tensors (transfer set included), the input normalisation,
the augmentation settings, the number of views and their seed, and what is stored (logits,
taps, dtype, top-k). Any change gives another key; ``meta.json`` repeats the ingredients and
is checked on load, so a stale or foreign cache is never read silently (it is rebuilt).

Augmentation (FKD-style, Shen & Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022 / arXiv 2021). With random augmentation a cached output is only
right for the view the teacher saw. The cache holds ``views`` augmented views per sample,
each with its augmentation parameters; each epoch every sample is shown one of them
(drawn from ``(loader seed, epoch)``), and the loader applies exactly that view's parameters
to the student's input (``BatchLoader.replay``) while the cache returns that view's teacher
outputs. A student view is never paired with another view's teacher outputs.

Storage. ``.npy`` files, one per tensor, each ``(V, N, ...)``: ``logits`` (V, N, K), or with
``topk`` ``topk_logp`` / ``topk_index`` (V, N, k) and ``rest`` (V, N) (the probability mass
outside the top k); ``feat.<i>`` (V, N, ...) per tap; ``aug.<name>`` (V, N, ...) per
augmentation parameter (mixing's partner as a dataset index with its weight and box, so a
mixed view replays exactly: the loader fetches the same partner and mixes it the same way).
Held in memory up to ``memory_limit_mb``, memory-mapped beyond.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from darkknowledge.data.augment import Augment, AugmentParams
from darkknowledge.data.batch import Batch, model_input, to_device
from darkknowledge.data.cache import cache_dir
from darkknowledge.data.fingerprint import update_with_tensor
from darkknowledge.data.seeds import make_generator
from darkknowledge.data.tensors import TensorData
from darkknowledge.engine.progress import Progress
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import Outputs

log = logging.getLogger(__name__)

FORMAT = 1
VIEW_STREAM = 3
"""Stream tag of the per-epoch choice of cached view."""
CACHE_BUILD_STREAM = 4
"""Stream tag of the cached views' augmentation draws."""


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds.

    Attributes:
        logits: Store the teacher's logits.
        taps: Teacher module paths whose features are stored.
        dtype: Storage dtype of logits and features (``fp16``, ``bf16``, ``fp32``).
        topk: Keep only the top-k log-probabilities (+ the rest's mass); None keeps all logits.
        views: Augmented views per sample (1 without augmentation).
    """

    logits: bool
    taps: tuple[str, ...] = ()
    dtype: str = "fp16"
    topk: int | None = None
    views: int = 1

    def check_holds(self, logits: bool, taps: tuple[str, ...], where: str = "cache") -> None:
        """Fail early (before building) when the losses need something this spec leaves out."""
        if logits and not self.logits:
            raise ConfigError(
                f"{where}: the losses need the teacher's logits but the cache holds none "
                "(set cache.logits: true or leave it unset)"
            )
        missing = [t for t in taps if t not in self.taps]
        if missing:
            raise ConfigError(
                f"{where}: the losses need teacher taps {missing} but the cache holds only "
                f"{list(self.taps)}; add them to cache.taps or leave cache.taps unset"
            )


def _to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return t.to(torch.bfloat16).view(torch.int16).numpy()  # numpy has no bf16: its raw 16 bits
    return t.to(torch.float16 if dtype == "fp16" else torch.float32).numpy()


def topk_compress(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities ``(B, k)``, their class indices ``(B, k)`` and the rest's mass ``(B,)``."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, K)
    values, index = logp.topk(k, dim=-1)  # (B, k) each
    rest = (1.0 - values.exp().sum(-1)).clamp_min(0.0)  # (B,)
    return values, index, rest


def topk_expand(values: torch.Tensor, index: torch.Tensor, rest: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits ``(B, K)`` whose softmax is the stored top-k probabilities, with the remaining
    mass spread evenly over the other classes (exact at T=1; an approximation at other T)."""
    k = values.shape[-1]
    other = (rest / max(1, num_classes - k)).clamp_min(1e-12).log()  # (B,)
    full = other.unsqueeze(-1).expand(values.shape[0], num_classes).clone()  # (B, K)
    return full.scatter_(-1, index.long(), values.float())


def augment_identity(augment: Augment | None) -> dict[str, Any] | None:
    """The augmentation settings in a cache key: the fields that are not at their defaults among those
    added later (scale, mixing), so caches built before those fields existed stay valid."""
    if augment is None:
        return None
    fields = dataclasses.asdict(augment)
    return {k: v for k, v in fields.items() if k not in _LATER_AUGMENT or v != _LATER_AUGMENT[k]}


_LATER_AUGMENT = {"scale": 0.0, "mixup": 0.0, "cutmix": 0.0, "mix_prob": 1.0}
"""Augmentation fields added after caches were first keyed, with their defaults."""


def cache_key(ingredients: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()[:20]


def data_identity(data: TensorData) -> str:
    """Hash of the training tensors' bytes (inputs, labels and stored views, transfer set included)."""
    h = hashlib.sha256()
    for t in (data.x, data.y, *(data.views[k] for k in sorted(data.views))):
        update_with_tensor(h, t)
    return h.hexdigest()[:20]


class TeacherOutputCache:
    """Stored teacher outputs of every (view, sample); see the module docstring.

    Args:
        path: The cache folder (``meta.json`` and the ``.npy`` files).
        memory_limit_mb: Load into memory up to this size, memory-map beyond.
    """

    def __init__(self, path: Path, memory_limit_mb: float = 1024.0) -> None:
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        total = sum(f.stat().st_size for f in self.path.glob("*.npy"))
        self.mapped = total > memory_limit_mb * 2**20
        mode: Literal["r"] | None = "r" if self.mapped else None
        arrays = {f.stem: np.load(f, mmap_mode=mode) for f in sorted(self.path.glob("*.npy"))}
        # in memory: torch tensors, indexed without a numpy round trip; beyond the limit: memory-mapped arrays
        self.arrays: dict[str, Any] = arrays if self.mapped else {k: torch.from_numpy(a) for k, a in arrays.items()}
        self.nbytes = total
        self.spec = CacheSpec(**{**self.meta["spec"], "taps": tuple(self.meta["spec"]["taps"])})
        self.num_samples = int(self.meta["num_samples"])
        self.num_classes = int(self.meta.get("num_classes", 0))
        self.aug_keys = tuple(self.meta.get("aug_keys", ()))
        self.build_seconds = float(self.meta.get("build_seconds", 0.0))
        self.reused = False

    def to(self, device: torch.device) -> TeacherOutputCache:
        """Keep an in-memory cache on ``device`` (e.g. the GPU): lookups then index there with
        the batch's own indices, without a host sync. A memory-mapped cache stays on disk."""
        if not self.mapped:
            self.arrays = {k: (v if k.startswith("aug.") else v.to(device)) for k, v in self.arrays.items()}
        return self

    # ------------------------------------------------------------ reading
    def _rows(self, name: str, view: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``(B, ...)`` of array ``name`` (raw storage dtype) for samples ``idx`` as views ``view``."""
        store = self.arrays[name]
        if not self.mapped:
            idx = to_device(idx, store.device)
            if view is None:
                return store[0].index_select(0, idx)  # (B, ...)
            flat = torch.add(
                idx, to_device(view, store.device), alpha=store.shape[1]
            )  # (B,) row of the (V * N, ...) view
            return store.flatten(0, 1).index_select(0, flat)  # a few times cheaper than store[view, idx]
        i = idx.cpu().numpy()
        rows = store[0][i] if view is None else store[view.cpu().numpy(), i]  # a copy of just these rows
        return torch.from_numpy(np.ascontiguousarray(rows))

    def _values(self, name: str, view: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
        rows = self._rows(name, view, idx)
        return (rows.view(torch.bfloat16) if self.spec.dtype == "bf16" else rows).float()

    def outputs(self, idx: torch.Tensor, view: torch.Tensor | None, device: torch.device) -> Outputs:
        """The teacher's outputs for samples ``idx`` ``(B,)`` seen as views ``view`` ``(B,)``.

        Returns float32 tensors on ``device``: logits ``(B, K)`` and features by tap path.
        """
        logits = None
        if self.spec.logits and self.spec.topk:
            logits = topk_expand(
                self._rows("topk_logp", view, idx),
                self._rows("topk_index", view, idx),
                self._rows("rest", view, idx),
                self.num_classes,
            )
        elif self.spec.logits:
            logits = self._values("logits", view, idx)
        feats = {tap: to_device(self._values(f"feat.{n}", view, idx), device) for n, tap in enumerate(self.spec.taps)}
        return Outputs(logits=None if logits is None else to_device(logits, device), features=feats)

    def lookup(self, batch: Batch) -> Outputs:
        """:meth:`outputs` for a loader's batch, on the batch's device. A memory-mapped cache
        reads with the batch's host indices, so a GPU run makes no device sync per step."""
        if self.mapped and batch.host_idx is not None and (batch.view is None or batch.host_view is not None):
            return self.outputs(batch.host_idx, batch.host_view, batch.x.device)
        return self.outputs(batch.idx, batch.view, batch.x.device)

    def view_params(self, idx: torch.Tensor, view: torch.Tensor) -> AugmentParams:
        """The stored augmentation parameters of samples ``idx`` as views ``view`` (CPU tensors)."""
        return {k: self._rows(f"aug.{k}", view, idx) for k in self.aug_keys}

    def replay(self, seed: int) -> Any:
        """A ``BatchLoader.replay`` function: each epoch, sample i is shown view
        ``randint(V)`` drawn from ``(seed, epoch)``, with that view's stored parameters."""
        views, n = self.spec.views, self.num_samples
        chosen: dict[int, torch.Tensor] = {}

        def replay(idx: torch.Tensor, epoch: int) -> tuple[AugmentParams, torch.Tensor]:
            if epoch not in chosen:
                chosen.clear()
                chosen[epoch] = torch.randint(views, (n,), generator=make_generator(seed, epoch, VIEW_STREAM))
            view = chosen[epoch][idx]  # (b,)
            return self.view_params(idx, view), view

        return replay

    def describe(self) -> dict[str, Any]:
        """Facts for the report: size, where, how it is held."""
        return {
            "path": str(self.path),
            "size_mb": round(self.nbytes / 2**20, 3),
            "mapped": self.mapped,
            "views": self.spec.views,
            "dtype": self.spec.dtype,
            "topk": self.spec.topk,
            "build_seconds": round(self.build_seconds, 3),
            "reused": self.reused,
        }


# ---------------------------------------------------------------- building
def _batches(
    teacher: Any, loader: Any, views: int, augment: Augment | None, params: list[AugmentParams]
) -> Iterator[tuple[int, torch.Tensor, Outputs]]:
    for v in range(views):
        if augment is not None:
            loader.replay = lambda idx, epoch, v=v: ({k: t[idx] for k, t in params[v].items()}, torch.full_like(idx, v))
        bar = Progress(True, "teacher cache")  # a bar on terminals only
        for batch in bar.epoch(loader, v, views, len(loader)):
            yield v, batch.idx.cpu(), teacher(model_input(batch, teacher))


def build_cache(
    teacher: Any,
    loader: Any,
    spec: CacheSpec,
    folder: Path,
    *,
    augment: Augment | None,
    seed: int,
    ingredients: dict[str, Any],
) -> None:
    """Compute every (view, sample) of ``loader.data`` with ``teacher`` and write ``folder``.

    The arrays are written memory-mapped into a temporary folder beside ``folder``, which is
    renamed into place at the end: readers see a whole cache or none.
    """
    data = loader.data
    n = len(data)
    ordered = loader.variant(shuffle=False, augment=augment, rank=0, world_size=1, drop_last=False)
    params: list[AugmentParams] = []
    if augment is not None:
        shape = tuple(data.x.shape[1:])
        params = [  # mixing partners are drawn by index of this data, so a stored view replays exactly
            augment.draw(n, make_generator(seed, v, CACHE_BUILD_STREAM), shape, population=n) for v in range(spec.views)
        ]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    start = time.perf_counter()
    arrays: dict[str, np.memmap] = {}

    def alloc(name: str, row: np.ndarray) -> np.memmap:
        if name not in arrays:
            arrays[name] = np.lib.format.open_memmap(
                tmp / f"{name}.npy", mode="w+", dtype=row.dtype, shape=(spec.views, n, *row.shape[1:])
            )
        return arrays[name]

    num_classes = 0
    try:
        for v, idx, out in _batches(teacher, ordered, spec.views, augment, params):
            i = idx.numpy()
            if spec.logits:
                if out.logits is None:
                    raise ConfigError("cache: the teacher produced no logits to cache")
                num_classes = int(out.logits.shape[-1])
                if spec.topk:
                    if spec.topk > num_classes:
                        raise ConfigError(f"cache.topk={spec.topk} exceeds the {num_classes} classes")
                    values, index, rest = topk_compress(out.logits.cpu(), spec.topk)
                    for name, t in (("topk_logp", values.half()), ("topk_index", index.int()), ("rest", rest)):
                        a = t.numpy()
                        alloc(name, a)[v, i] = a
                else:
                    a = _to_storage(out.logits.cpu(), spec.dtype)
                    alloc("logits", a)[v, i] = a
            for k, tap in enumerate(spec.taps):
                if tap not in out.features:
                    raise ConfigError(f"cache: the teacher recorded no feature at tap {tap!r}")
                a = _to_storage(out.features[tap].cpu(), spec.dtype)
                alloc(f"feat.{k}", a)[v, i] = a
        for v, p in enumerate(params):
            for key, t in p.items():
                a = t.numpy()
                alloc(f"aug.{key}", a)[v] = a
        for a in arrays.values():
            a.flush()
        arrays.clear()
        meta = {
            "format": FORMAT,
            "ingredients": ingredients,
            "spec": dataclasses.asdict(spec),
            "num_samples": n,
            "num_classes": num_classes,
            "aug_keys": sorted(params[0]) if params else [],
            "build_seconds": time.perf_counter() - start,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        arrays.clear()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cached_views(views: int, augment: Augment | None) -> int | None:
    """How many views to cache for a loader with ``augment``: 1 without augmentation,
    ``views`` with it, or None (``views == 0`` with augmentation: run the teacher live)."""
    if augment is None:
        return 1
    if views == 0:
        log.info("data.augment is on and cache.views is 0: the teacher runs live on every augmented view")
        return None
    return views


def cache_root() -> Path:
    return cache_dir() / "teacher_outputs"


def load_or_build(
    teacher: Any,
    loader: Any,
    spec: CacheSpec,
    *,
    augment: Augment | None,
    seed: int,
    memory_limit_mb: float,
    dist: Any = None,
    root: Path | None = None,
) -> TeacherOutputCache:
    """The cache for this teacher, data and spec: read when present and valid, else built
    (by rank 0; the other ranks wait at a barrier and then read the same files)."""
    if not isinstance(loader.data, TensorData):
        raise ConfigError("cache: the teacher-output cache needs an in-memory tensor dataset")
    ingredients = {
        "format": FORMAT,
        "teacher": teacher.hash,
        "data": data_identity(loader.data),
        "normalize": [list(map(float, t)) for t in loader._norm] if loader._norm is not None else None,
        "augment": augment_identity(augment),
        "seed": seed if augment is not None else None,
        "spec": dataclasses.asdict(spec),
    }
    view = getattr(teacher, "input", None)
    if view is not None:  # a paired dataset: which view the teacher read (a cache is never read for another)
        ingredients["input"] = loader.views.identity(view)
    ingredients = json.loads(json.dumps(ingredients))  # tuples -> lists, as meta.json holds them
    folder = (root or cache_root()) / cache_key(ingredients)
    main = dist is None or dist.is_main
    reused = True
    if main and not _valid(folder, ingredients):
        log.info(
            "building the teacher-output cache (%d samples x %d views) in %s", len(loader.data), spec.views, folder
        )
        build_cache(teacher, loader, spec, folder, augment=augment, seed=seed, ingredients=ingredients)
        reused = False
    if dist is not None:
        dist.barrier()
    if not _valid(folder, ingredients):
        raise ConfigError(f"cache: {folder} is missing or does not match this teacher and data after building")
    cache = TeacherOutputCache(folder, memory_limit_mb)
    cache.reused = reused
    log.info(
        "teacher-output cache %s: %.1f MB (%s)",
        folder.name,
        cache.nbytes / 2**20,
        "memory-mapped" if cache.mapped else "in memory",
    )
    return cache


def _valid(folder: Path, ingredients: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a whole cache made from ``ingredients``. A damaged one (an
    unreadable or foreign ``meta.json``, a missing, truncated or misshapen array) is logged as a
    warning and reported invalid, so the caller rebuilds it."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.warning("teacher-output cache %s has an unreadable meta.json (%s); rebuilding it", folder, exc)
        return False
    if not isinstance(meta, dict) or meta.get("ingredients") != ingredients:
        log.warning("teacher-output cache %s was made for another teacher, data or spec; rebuilding it", folder)
        return False
    problem = _arrays_problem(folder, meta)
    if problem:
        log.warning("teacher-output cache %s is damaged (%s); rebuilding it", folder, problem)
        return False
    return True


def _arrays_problem(folder: Path, meta: dict[str, Any]) -> str:
    """What is wrong with the arrays ``meta`` promises ('' when each is whole and of its shape)."""
    try:
        spec = CacheSpec(**{**meta["spec"], "taps": tuple(meta["spec"]["taps"])})
        rows = (spec.views, int(meta["num_samples"]))
        aug_keys = [str(k) for k in meta.get("aug_keys", ())]
    except (KeyError, TypeError, ValueError) as exc:
        return f"meta.json lacks or mistypes {exc}"
    names = [f"feat.{i}" for i in range(len(spec.taps))] + [f"aug.{k}" for k in aug_keys]
    if spec.logits:
        names += ["topk_logp", "topk_index", "rest"] if spec.topk else ["logits"]
    for name in names:
        path = folder / f"{name}.npy"
        if not path.is_file():
            return f"{path.name} is missing"
        try:
            array = np.load(path, mmap_mode="r")  # reads the header; a truncated file cannot be mapped
        except (OSError, ValueError, EOFError) as exc:
            return f"{path.name} is unreadable or truncated: {exc}"
        if tuple(array.shape[:2]) != rows:
            return f"{path.name} has shape {tuple(array.shape)}, expected {rows} first"
        del array
    return ""
