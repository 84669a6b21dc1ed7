"""Sequence teacher-output cache: round trips to the sparse-target builders, sizes, identity,
resumption of an interrupted build, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from darkknowledge.errors import CheckpointError, ConfigError, ShapeError
from darkknowledge.lm.targets import sampled_targets, topk_targets
from darkknowledge.teachers.token_cache import (
    MANIFEST,
    PROGRESS,
    TokenCache,
    build_token_cache,
    load_or_build,
    open_token_cache,
    partial_dir,
)
from darkknowledge.teachers.token_store import (
    Layout,
    block_generator,
    count_dtype,
    id_dtype,
)

N, L, V = 20, 8, 50


class FakeTeacher:
    """A deterministic causal 'LM': embedding, running mean over the prefix, linear head.

    Records the blocks it was asked for; raises when it reaches block ``fail_at``.
    """

    def __init__(self, vocab: int = V, fail_at: int | None = None, x: torch.Tensor | None = None) -> None:
        g = torch.Generator().manual_seed(123)
        self.emb = torch.randn(vocab, 16, generator=g)
        self.head = torch.randn(16, vocab, generator=g) * 2.0
        self.fail_at, self.x, self.seen = fail_at, x, []

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        assert torch.is_inference_mode_enabled()
        blocks = [int((self.x == row).all(1).nonzero()[0]) for row in ids] if self.x is not None else []
        if self.fail_at is not None and self.fail_at in blocks:
            raise RuntimeError("teacher died")
        self.seen += blocks
        return self.logits(ids)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb[ids]  # (b, L, 16)
        h = h.cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)  # (b, L, 16) causal mean
        return h @ self.head  # (b, L, V)


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randint(0, V, (N, L), generator=torch.Generator().manual_seed(0))


def build(tmp_path: Path, x: torch.Tensor, kind: str, name: str = "c", teacher=None, **kw) -> TokenCache:
    teacher = teacher or FakeTeacher()
    return build_token_cache(teacher, x, tmp_path / name, kind=kind, fingerprint="fp", **kw)


def npy_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.npy"))}


def test_topk_round_trip(tmp_path: Path, x: torch.Tensor) -> None:
    cache = build(tmp_path, x, "topk", k=5, T=2.0, batch_size=3)
    idx = torch.tensor([7, 2, 19, 2])
    got = cache.targets(idx)
    want = topk_targets(FakeTeacher().logits(x[idx]), 5, T=2.0)
    assert got.kind == "topk" and got.positions == (4, L) and got.vocab == V and got.T == 2.0
    assert got.ids.dtype == torch.int64 and torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logp, want.logp.half().float(), rtol=0, atol=0)  # exactly the fp16 rounding
    torch.testing.assert_close(got.logp, want.logp, rtol=1e-3, atol=1e-3)
    assert torch.equal(got.tail, want.tail)  # stored in float32 from the unrounded log-probs
    mass = got.logp.exp().sum(-1) + got.tail.exp()  # listed + tail = 1 up to the fp16 rounding
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=2e-3)
    assert got.weights is None


def test_sampled_matches_builder_with_per_block_generator(tmp_path: Path, x: torch.Tensor) -> None:
    draws, seed = 6, 11
    a = build(tmp_path, x, "sampled", "a", draws=draws, seed=seed, batch_size=3)
    b = build(tmp_path, x, "sampled", "b", draws=draws, seed=seed, batch_size=8, chunk_blocks=5)
    assert npy_bytes(a.path) == npy_bytes(b.path)  # draws do not depend on batching
    idx = torch.tensor([4, 0, 13])
    got = a.targets(idx)
    logits = FakeTeacher().logits(x)
    for row, block in enumerate(idx.tolist()):
        want = sampled_targets(logits[block], draws, 1.0, block_generator(seed, block))  # (L, draws) rows
        sl = slice(row * L, (row + 1) * L)
        assert torch.equal(got.ids[sl], want.ids)
        assert torch.equal(got.weights[sl], want.weights)
        assert torch.equal(got.tail[sl], want.tail)
        torch.testing.assert_close(got.logp[sl], want.logp.half().float(), rtol=0, atol=0)
    assert got.kind == "sampled" and got.positions == (3, L)
    torch.testing.assert_close(got.weights.sum(-1), torch.ones(3 * L))
    other = build(tmp_path, x, "sampled", "c", draws=draws, seed=seed + 1)
    assert not torch.equal(other.targets(idx).ids, got.ids)  # the seed matters


def test_dense_round_trip(tmp_path: Path, x: torch.Tensor) -> None:
    cache = build(tmp_path, x, "dense", T=0.5, batch_size=7)
    idx = torch.tensor([3, 3, 0])
    got = cache.targets(idx)
    want = torch.log_softmax(FakeTeacher().logits(x[idx]) / 0.5, dim=-1)
    assert got.shape == (3, L, V) and got.dtype == torch.float16  # widened by the losses, a chunk at a time
    assert torch.equal(got, want.half())
    assert cache.bytes_per_token == 2 * V


@pytest.mark.parametrize(
    "kind,kw,expect", [("topk", {"k": 5}, 5 * 4 + 4), ("sampled", {"draws": 6}, 6 * 5 + 4), ("dense", {}, 2 * V)]
)
def test_bytes_per_token_match_files(tmp_path: Path, x: torch.Tensor, kind: str, kw: dict, expect: int) -> None:
    cache = build(tmp_path, x, kind, **kw)
    assert cache.bytes_per_token == expect
    payload = sum(f.stat().st_size - np.load(f, mmap_mode="r").offset for f in cache.path.glob("*.npy"))
    assert payload == expect * N * L
    info = cache.describe()
    assert info["bytes_per_token"] == expect and info["kind"] == kind and info["path"] == str(cache.path)
    assert info["teacher_tokens_per_s"] > 0 and cache.manifest["build_seconds"] > 0
    assert sorted(p.name for p in cache.path.iterdir()) == sorted(
        [MANIFEST, *(f.name for f in cache.path.glob("*.npy"))]
    )
    assert json.loads((cache.path / MANIFEST).read_text())["fingerprint"] == "fp"


def test_layout_sizes_of_the_brief() -> None:
    assert Layout("topk", 49152, 64).bytes_per_token == 260
    assert Layout("sampled", 49152, 48).bytes_per_token == 48 * 5 + 4
    assert Layout("sampled", 49152, 300).bytes_per_token == 300 * 6 + 4  # uint16 counts past 255 draws
    assert Layout("dense", 49152, 49152).bytes_per_token == 2 * 49152


def test_id_dtype_by_vocab(tmp_path: Path) -> None:
    assert id_dtype(2**16) == np.uint16 and id_dtype(2**16 + 1) == np.int32
    assert count_dtype(255) == np.uint8 and count_dtype(256) == np.uint16
    big = 2**16 + 1
    x = torch.tensor([[0, 5], [7, 1]])
    teacher = FakeTeacher(vocab=big)
    logits = teacher.logits(x)
    logits[0, 1, big - 1] = 100.0  # the largest id is the top one at one position
    cache = build_token_cache(
        lambda ids: logits[: len(ids)] if ids[0, 0] == 0 else logits[1:],
        x,
        tmp_path / "big",
        kind="topk",
        k=3,
        fingerprint="fp",
        batch_size=1,
    )
    assert cache.arrays["ids"].dtype == np.int32 and cache.bytes_per_token == 3 * 6 + 4
    got = cache.targets(torch.tensor([0, 1]))
    assert torch.equal(got.ids, topk_targets(logits, 3).ids) and int(got.ids[1, 0]) == big - 1


def test_fingerprint_mismatch_and_absence(tmp_path: Path, x: torch.Tensor) -> None:
    assert open_token_cache(tmp_path / "nothing", "fp") is None
    cache = build(tmp_path, x, "topk", k=4)
    assert open_token_cache(cache.path, "fp").describe()["kind"] == "topk"
    with pytest.raises(CheckpointError, match="another teacher"):
        open_token_cache(cache.path, "other-teacher")


def test_load_or_build_keeps_one_folder_per_key(tmp_path: Path, x: torch.Tensor) -> None:
    t = FakeTeacher(x=x)
    a = load_or_build(t, x, kind="topk", k=4, fingerprint="fp", root=tmp_path)
    assert not a.reused and len(t.seen) == N
    again = load_or_build(t, x, kind="topk", k=4, fingerprint="fp", root=tmp_path)
    assert again.reused and again.path == a.path and len(t.seen) == N  # the teacher did not run again
    b = load_or_build(t, x, kind="topk", k=4, fingerprint="fp2", root=tmp_path)
    c = load_or_build(t, x, kind="topk", k=5, fingerprint="fp", root=tmp_path)
    d = load_or_build(t, x.flip(0), kind="topk", k=4, fingerprint="fp", root=tmp_path)  # data hashed too
    assert len({a.path, b.path, c.path, d.path}) == 4 and a.path.is_dir()
    (a.path / "tail.npy").write_bytes(b"garbage")  # damaged: rebuilt with a warning
    fixed = load_or_build(t, x, kind="topk", k=4, fingerprint="fp", root=tmp_path)
    assert not fixed.reused and np.array_equal(fixed.arrays["tail"], b.arrays["tail"])


@pytest.mark.parametrize("kind,kw", [("sampled", {"draws": 5, "seed": 3}), ("topk", {"k": 4}), ("dense", {})])
def test_interrupted_build_resumes_to_identical_files(tmp_path: Path, x: torch.Tensor, kind: str, kw: dict) -> None:
    whole = build(tmp_path, x, kind, "whole", batch_size=2, **kw)
    path = tmp_path / "resumed"
    dying = FakeTeacher(fail_at=10, x=x)
    with pytest.raises(RuntimeError, match="teacher died"):
        build_token_cache(dying, x, path, kind=kind, fingerprint="fp", batch_size=2, chunk_blocks=4, **kw)
    assert dying.seen == list(range(10))
    assert not path.exists() and open_token_cache(path, "fp") is None  # no manifest, no cache
    assert json.loads((partial_dir(path) / PROGRESS).read_text())["done"] == 8  # chunks [0, 4), [4, 8)
    again = FakeTeacher(x=x)
    calls = []
    resumed = build_token_cache(
        again,
        x,
        path,
        kind=kind,
        fingerprint="fp",
        batch_size=2,
        chunk_blocks=4,
        progress=lambda done, total: calls.append((done, total)),
        **kw,
    )
    assert again.seen == list(range(8, N))  # only the blocks after the last complete chunk
    assert calls[0] == (10, N) and calls[-1] == (N, N)
    assert npy_bytes(resumed.path) == npy_bytes(whole.path)
    assert not partial_dir(path).exists() and not (path / PROGRESS).exists()


def test_partial_build_of_other_params_is_discarded(tmp_path: Path, x: torch.Tensor) -> None:
    path = tmp_path / "c"
    with pytest.raises(RuntimeError):
        build_token_cache(
            FakeTeacher(fail_at=6, x=x), x, path, kind="topk", k=3, fingerprint="fp", batch_size=2, chunk_blocks=2
        )
    t = FakeTeacher(x=x)
    cache = build_token_cache(t, x, path, kind="topk", k=4, fingerprint="fp", batch_size=2, chunk_blocks=2)
    assert t.seen == list(range(N)) and cache.layout.slots == 4


def test_finished_build_not_yet_renamed_is_only_renamed(tmp_path: Path, x: torch.Tensor) -> None:
    cache = build(tmp_path, x, "topk", k=3)
    files, key = npy_bytes(cache.path), cache.key
    cache.path.rename(partial_dir(cache.path))  # as if killed between the manifest and the rename
    (partial_dir(cache.path) / PROGRESS).write_text(
        json.dumps(
            {"key": key, "done": N, "vocab": V, "build_seconds": 1.0, "teacher_seconds": 1.0, "teacher_tokens": N * L}
        )
    )

    def no_teacher(ids: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the teacher ran again")

    again = build(tmp_path, x, "topk", k=3, teacher=no_teacher)
    assert npy_bytes(again.path) == files and not partial_dir(again.path).exists()


def test_rebuild_replaces_and_manifest_is_what_makes_a_cache(tmp_path: Path, x: torch.Tensor) -> None:
    cache = build(tmp_path, x, "topk", k=3)
    (cache.path / MANIFEST).unlink()
    assert open_token_cache(cache.path, "fp") is None
    rebuilt = build(tmp_path, x, "topk", k=2)  # over the same folder
    assert rebuilt.targets(torch.tensor([0])).k == 2


def test_bad_inputs(tmp_path: Path, x: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="kind 'full'"):
        build(tmp_path, x, "full")
    with pytest.raises(ConfigError, match="k >= 1"):
        build(tmp_path, x, "topk")
    with pytest.raises(ConfigError, match="draws >= 1"):
        build(tmp_path, x, "sampled", draws=0)
    with pytest.raises(ConfigError, match="T must be > 0"):
        build(tmp_path, x, "topk", k=2, T=0.0)
    with pytest.raises(ShapeError, match=r"\(N, L\)"):
        build(tmp_path, x[0], "topk", k=2)
    with pytest.raises(ConfigError, match="between 1 and the vocabulary size 50"):
        build(tmp_path, x, "topk", k=51)
    with pytest.raises(ShapeError, match="must return logits"):
        build(tmp_path, x, "topk", k=2, teacher=lambda ids: torch.zeros(len(ids), V))
    cache = build(tmp_path, x, "topk", k=2)
    with pytest.raises(ConfigError, match="block index 20 is out of range"):
        cache.targets(torch.tensor([0, 20]))
    with pytest.raises(ShapeError, match="block indices"):
        cache.targets(torch.zeros(2, 2, dtype=torch.long))
    empty = cache.targets(torch.tensor([], dtype=torch.long))
    assert empty.ids.shape == (0, 2) and empty.positions == (0, L)
